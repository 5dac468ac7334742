"""Synthetic knowledge documents, question phrasings and a tiny word-level tokenizer.

A *document* is a small set of facts ``entity -> relation -> value`` about entities that appear
in no other document (disjoint entities per document). Every fact is asked in several
phrasings. Values are two words (e.g. ``pale cobalt``) so that an answer is a short token
sequence, scored by exact match of all its tokens.

Three of the four phrasings end right after the subject (``... of <entity> ?``): the hidden state
that predicts the answer then sits next to the only token that tells documents apart, which is
what a data-free router can see. The fourth puts the subject first (``<entity> : which <rel> ?``)
and is kept as the harder case; results are also reported per phrasing.

A separate *pre-training* corpus uses the same grammar with its own entities (disjoint from every
document's) so the base model learns the language and the "look up a fact about the subject"
pattern without knowing any document fact.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"

RELATIONS = ("color", "city", "job", "pet")
# Asked in pre-training only, about every entity (documents' included): the base model "knows the
# names" (trained embeddings, a reason to look at the subject) but none of the documents' facts.
PRETRAIN_RELATIONS = ("age",)

# A two-word value = one modifier + one head word, drawn per relation.
VALUE_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "color": (("pale", "dark", "bright", "deep", "soft", "dull"),
              ("red", "blue", "green", "amber", "cobalt", "ochre", "violet", "teal", "ivory", "rust")),
    "city": (("north", "south", "east", "west", "old", "new"),
             ("harbor", "ridge", "falls", "haven", "field", "brook", "ford", "gate", "vale", "moor")),
    "job": (("junior", "senior", "chief", "head", "lead", "night"),
            ("baker", "pilot", "nurse", "clerk", "miner", "tailor", "judge", "smith", "farmer", "poet")),
    "pet": (("small", "large", "old", "young", "lazy", "loud"),
            ("cat", "dog", "owl", "hare", "goat", "crow", "fox", "newt", "pony", "wren")),
    "age": (("about", "nearly", "over", "under", "just", "almost"),
            ("ten", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred")),
}

# {r}: relation word, {e}: entity. The answer follows the last word.
TEMPLATES = (
    "what is the {r} of {e} ?",
    "tell me the {r} of {e} :",
    "the {r} of {e} is",
    "{e} : which {r} ?",
)

_SYLLABLES = ("ka", "lo", "mi", "ru", "ten", "vos", "zil", "bra", "dun", "fe", "gor", "hal", "jin", "pek",
              "sam", "tor", "ul", "wex", "yar", "qui")


def entity_names(count: int, rng: random.Random, taken: set[str] | None = None) -> list[str]:
    """``count`` distinct pseudo-names (two or three syllables), not in ``taken``."""
    taken = set() if taken is None else taken
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
    facts: dict[tuple[str, str], str] = field(default_factory=dict)  # (entity, relation) -> "mod head"


@dataclass(frozen=True)
class Question:
    doc: int            # gold document / adapter index
    entity: str
    relation: str
    template: int       # index into TEMPLATES
    prompt: tuple[int, ...]   # <bos> + question tokens
    answer: tuple[int, ...]   # value tokens + <eos>


@dataclass
class KnowledgeData:
    tokenizer: WordTokenizer
    documents: list[Document]
    questions: list[Question]            # every fact of every document in every phrasing, doc-major
    pretrain: list[tuple[int, ...]]      # token sequences (prompt + answer) of the pre-training corpus

    def by_doc(self) -> list[list[Question]]:
        out: list[list[Question]] = [[] for _ in self.documents]
        for q in self.questions:
            out[q.doc].append(q)
        return out


def _random_facts(entities: list[str], rng: random.Random, relations=RELATIONS) -> dict[tuple[str, str], str]:
    facts = {}
    for e in entities:
        for r in relations:
            mods, heads = VALUE_WORDS[r]
            facts[(e, r)] = f"{rng.choice(mods)} {rng.choice(heads)}"
    return facts


def _qa(tok: WordTokenizer, doc: int, e: str, r: str, value: str, t: int) -> Question:
    return Question(doc, e, r, t, tuple(tok.encode(TEMPLATES[t].format(r=r, e=e), bos=True)),
                    tuple(tok.encode(value) + [tok.eos_token_id]))


def make_data(n_docs: int, entities_per_doc: int = 3, pretrain_entities: int = 96, seed: int = 0,
              mention_doc_entities: bool = True) -> KnowledgeData:
    """N documents with disjoint entities, every fact in every phrasing, plus the pre-training corpus."""
    rng = random.Random(seed)
    taken: set[str] = set()
    doc_entities = [entity_names(entities_per_doc, rng, taken) for _ in range(n_docs)]
    pre_entities = entity_names(pretrain_entities, rng, taken)

    words = [PAD, BOS, EOS] + list(RELATIONS) + list(PRETRAIN_RELATIONS)
    for t in TEMPLATES:
        words += [w for w in t.split() if not w.startswith("{")]
    for mods, heads in VALUE_WORDS.values():
        words += list(mods) + list(heads)
    words += [e for ents in doc_entities for e in ents] + pre_entities
    tok = WordTokenizer(words)

    documents, questions = [], []
    for i, ents in enumerate(doc_entities):
        doc = Document(i, ents, _random_facts(ents, rng))
        documents.append(doc)
        for (e, r), v in doc.facts.items():
            for t in range(len(TEMPLATES)):
                questions.append(_qa(tok, i, e, r, v, t))

    pre_facts = _random_facts(pre_entities, rng, RELATIONS + PRETRAIN_RELATIONS)
    if mention_doc_entities:
        pre_facts.update(_random_facts([e for ents in doc_entities for e in ents], rng, PRETRAIN_RELATIONS))
    pretrain = []
    for (e, r), v in pre_facts.items():
        for t in range(len(TEMPLATES)):
            q = _qa(tok, -1, e, r, v, t)
            pretrain.append(q.prompt + q.answer)
    return KnowledgeData(tok, documents, questions, pretrain)
