"""Synthetic knowledge documents, their text, the questions, and a tiny word-level tokenizer.

A *document* is a small set of facts ``entity -> relation -> value`` about entities that appear
in no other document (disjoint entities per document, as a Wikipedia page is about its own
subjects). Its *text* is every fact written in every phrasing of the chosen question form,
followed by the value (``the color of kalomi pale-cobalt``); a knowledge adapter is trained on
that text, and the evaluation asks the same facts as questions (prompt = the phrasing, answer =
the value). Every question mentions its document's entity.

Question forms (the ``question_form`` of :func:`make_data`):

- ``subject-last``: the entity is the last prompt token, so the token that emits the answer is
  the entity mention itself. In a 2-layer word-level model this is where the hidden state carries
  the document's identity; it is what the paper's setting has for free (questions name the
  document's entities, and a large model carries them into every later token).
- ``subject-then-mark``: a marker after the entity (``... of kalomi ?``) or the entity first
  (``kalomi : which color ?``); the answer is emitted at the marker, whose hidden state in this
  tiny model is dominated by the shared template (the earlier demo's phrasings).

Value forms: ``head-word`` values are one token from 10 per relation (``cobalt``), so many entities
share a value; ``one-word`` values are one token from 60 per relation (``pale-cobalt``);
``two-words`` values are two tokens (``pale cobalt``), so the answer is a two-token sequence.

A separate *pre-training* corpus uses the same grammar with its own entities (disjoint from every
document's), so the base model learns the language and the "look up a fact about the subject"
pattern without knowing any document fact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

RELATIONS = ("color", "city", "job", "pet")
# Asked in pre-training only (about pre-training entities, and about the documents' entities when
# ``mention_doc_entities``): the base model can then know the documents' names but none of their facts.
PRETRAIN_RELATIONS = ("age",)

# A value = one modifier + one head word, drawn per relation.
VALUE_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "color": (
        ("pale", "dark", "bright", "deep", "soft", "dull"),
        ("red", "blue", "green", "amber", "cobalt", "ochre", "violet", "teal", "ivory", "rust"),
    ),
    "city": (
        ("north", "south", "east", "west", "old", "new"),
        ("harbor", "ridge", "falls", "haven", "field", "brook", "ford", "gate", "vale", "moor"),
    ),
    "job": (
        ("junior", "senior", "chief", "head", "lead", "night"),
        ("baker", "pilot", "nurse", "clerk", "miner", "tailor", "judge", "smith", "farmer", "poet"),
    ),
    "pet": (
        ("small", "large", "old", "young", "lazy", "loud"),
        ("cat", "dog", "owl", "hare", "goat", "crow", "fox", "newt", "pony", "wren"),
    ),
    "age": (
        ("about", "nearly", "over", "under", "just", "almost"),
        ("ten", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred"),
    ),
}
VALUE_FORMS = ("head-word", "one-word", "two-words")

# {r}: relation word, {e}: entity. The answer follows the last word.
QUESTION_FORMS: dict[str, tuple[str, ...]] = {
    "subject-last": (
        "what is the {r} of {e}",
        "tell me the {r} of {e}",
        "the {r} of {e}",
        "which {r} has {e}",
    ),
    "subject-then-mark": (
        "what is the {r} of {e} ?",
        "tell me the {r} of {e} :",
        "the {r} of {e} is",
        "{e} : which {r} ?",
    ),
}

_SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ru",
    "ten",
    "vos",
    "zil",
    "bra",
    "dun",
    "fe",
    "gor",
    "hal",
    "jin",
    "pek",
    "sam",
    "tor",
    "ul",
    "wex",
    "yar",
    "qui",
)


#: distinct pseudo-names entity_names can make (two or three syllables: no two spell the same)
NAME_POOL = len(_SYLLABLES) ** 2 + len(_SYLLABLES) ** 3


def max_documents(entities_per_doc: int = 3, pretrain_entities: int = 96) -> int:
    """The most documents :func:`make_data` can name distinct entities for."""
    return (NAME_POOL - pretrain_entities) // entities_per_doc


def entity_names(count: int, rng: random.Random, taken: set[str] | None = None) -> list[str]:
    """``count`` distinct pseudo-names (two or three syllables), not in ``taken``."""
    taken = set() if taken is None else taken
    if count + len(taken) > NAME_POOL:  # the draws below would never end
        raise ValueError(f"{count} more entity names than the {NAME_POOL - len(taken)} of {NAME_POOL} left")
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 3))))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary (no download, no merges)."""

    def __init__(self, words: list[str]):
        self.vocab = [PAD, BOS, EOS] + sorted(set(words) - {PAD, BOS, EOS})
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_token_id, self.bos_token_id, self.eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = [self.index[w] for w in text.split()]
        return [self.bos_token_id] + ids if bos else ids

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)


@dataclass
class Document:
    index: int
    entities: list[str]
    facts: dict[tuple[str, str], str] = field(default_factory=dict)  # (entity, relation) -> value text


@dataclass(frozen=True)
class Question:
    doc: int  # gold document / adapter index
    entity: str
    relation: str
    template: int  # index into the question form's phrasings
    prompt: tuple[int, ...]  # <bos> + question tokens
    answer: tuple[int, ...]  # value tokens + <eos>


@dataclass
class KnowledgeData:
    tokenizer: WordTokenizer
    documents: list[Document]
    questions: list[Question]  # every fact of every document in every phrasing, doc-major
    pretrain: list[tuple[int, ...]]  # token sequences (prompt + answer) of the pre-training corpus
    templates: tuple[str, ...] = QUESTION_FORMS["subject-last"]
    pretrain_questions: list[Question] = field(default_factory=list)  # the corpus as questions (doc -1)

    def by_doc(self) -> list[list[Question]]:
        out: list[list[Question]] = [[] for _ in self.documents]
        for q in self.questions:
            out[q.doc].append(q)
        return out

    def entity_positions(self) -> list[int]:
        """Per question, the prompt position of its entity mention."""
        return [q.prompt.index(self.tokenizer.index[q.entity]) for q in self.questions]


def value_vocabulary(value_form: str) -> list[str]:
    """Every value word the facts can use."""
    words = []
    for mods, heads in VALUE_WORDS.values():
        if value_form == "head-word":
            words += list(heads)
        elif value_form == "one-word":
            words += [f"{m}-{h}" for m in mods for h in heads]
        else:
            words += list(mods) + list(heads)
    return list(dict.fromkeys(words))


def _random_facts(entities: list[str], rng: random.Random, relations, value_form: str) -> dict[tuple[str, str], str]:
    joiner = "-" if value_form == "one-word" else " "
    facts = {}
    for e in entities:
        for r in relations:
            mods, heads = VALUE_WORDS[r]
            head = rng.choice(heads)
            facts[(e, r)] = head if value_form == "head-word" else f"{rng.choice(mods)}{joiner}{head}"
    return facts


def _qa(tok: WordTokenizer, templates, doc: int, e: str, r: str, value: str, t: int) -> Question:
    return Question(
        doc,
        e,
        r,
        t,
        tuple(tok.encode(templates[t].format(r=r, e=e), bos=True)),
        tuple(tok.encode(value) + [tok.eos_token_id]),
    )


def make_data(
    n_docs: int,
    entities_per_doc: int = 3,
    pretrain_entities: int = 96,
    seed: int = 0,
    mention_doc_entities: bool = False,
    question_form: str = "subject-last",
    value_form: str = "one-word",
) -> KnowledgeData:
    """N documents with disjoint entities, every fact in every phrasing, plus the pre-training corpus."""
    if question_form not in QUESTION_FORMS:
        raise ValueError(f"question_form must be one of {sorted(QUESTION_FORMS)}, got {question_form!r}")
    if value_form not in VALUE_FORMS:
        raise ValueError(f"value_form must be one of {VALUE_FORMS}, got {value_form!r}")
    templates = QUESTION_FORMS[question_form]
    rng = random.Random(seed)
    taken: set[str] = set()
    doc_entities = [entity_names(entities_per_doc, rng, taken) for _ in range(n_docs)]
    pre_entities = entity_names(pretrain_entities, rng, taken)

    words = [PAD, BOS, EOS] + list(RELATIONS) + list(PRETRAIN_RELATIONS) + value_vocabulary(value_form)
    for t in templates:
        words += [w for w in t.split() if not w.startswith("{")]
    words += [e for ents in doc_entities for e in ents] + pre_entities
    tok = WordTokenizer(words)

    documents, questions = [], []
    for i, ents in enumerate(doc_entities):
        doc = Document(i, ents, _random_facts(ents, rng, RELATIONS, value_form))
        documents.append(doc)
        for (e, r), v in doc.facts.items():
            for t in range(len(templates)):
                questions.append(_qa(tok, templates, i, e, r, v, t))

    pre_facts = _random_facts(pre_entities, rng, RELATIONS + PRETRAIN_RELATIONS, value_form)
    if mention_doc_entities:
        pre_facts.update(_random_facts([e for ents in doc_entities for e in ents], rng, PRETRAIN_RELATIONS, value_form))
    pre_questions = [
        _qa(tok, templates, -1, e, r, v, t) for (e, r), v in pre_facts.items() for t in range(len(templates))
    ]
    pretrain = [q.prompt + q.answer for q in pre_questions]
    return KnowledgeData(tok, documents, questions, pretrain, templates, pre_questions)


def general_documents(data: KnowledgeData, count: int, entities_per_doc: int) -> list[list[Question]]:
    """``count`` documents' worth of pre-training facts, for general adapters (GKS): each the
    RELATIONS facts of ``entities_per_doc`` pre-training entities in every phrasing, shaped like a
    knowledge document but about entities the base model was trained on, not a library document's."""
    entities = list(dict.fromkeys(q.entity for q in data.pretrain_questions if q.doc == -1))
    documents_entities = {e for d in data.documents for e in d.entities}
    entities = [e for e in entities if e not in documents_entities]  # mention_doc_entities adds those
    if count * entities_per_doc > len(entities):
        raise ValueError(
            f"{count} general adapters x {entities_per_doc} entities need {count * entities_per_doc} "
            f"pre-training entities; the corpus has {len(entities)}"
        )
    group = {e: i // entities_per_doc for i, e in enumerate(entities[: count * entities_per_doc])}
    out: list[list[Question]] = [[] for _ in range(count)]
    for q in data.pretrain_questions:
        if q.entity in group and q.relation in RELATIONS:
            out[group[q.entity]].append(q)
    return out
