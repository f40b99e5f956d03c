"""A controlled knowledge task: fictional people whose facts a model can know only by reading memory.

Each entity is a generated person (syllable names: a first name from a shared pool, a surname of its own) with one
value per attribute (`ATTRIBUTES`: a year, a fictional city, employer and pet name, and words of fixed English
lists). Every value is a single word, and the value vocabularies and the names are pairwise disjoint, so a name
never spells an answer and an answer names one attribute only. Values are drawn independently of the names and
each value is shared by many entities, so a name does not predict its values.

Entities are split by the seed into *training* and *held-out* ones (`round(num_entities * heldout_fraction)`
held out). The three texts:
- training text (`training_documents`): `bios_per_entity` biographies of every training entity, each stating every
  attribute once, in random order, in one of `len(phrasings)` phrasings, after one of the `OPENINGS`; doc ids
  `entity:<i>:<j>`. Held-out entities have none: they are never in the training text.
- knowledge base (`knowledge_texts`): one reference per entity, training and held-out, in entity order, in the
  record style of `KB_TEMPLATE` (unlike the bios), one reference of `memory.ref_len` = 128 tokens: 92-120 tokens
  with a 1000-piece tokenizer of the embedded corpus (the tests'), 80-105 with a 4096-piece one (the demo's).
  `generate(..., num_attributes=N)` gives entities the first N attributes only, and `kb_template(N)` shorter
  references (N = 4: about a quarter of the length), for studying how reference length bears on reading.
- cloze items (`cloze_items`): per entity and attribute, a prompt that ends right before the value and the answer.
  The prompt is the attribute's first bio phrasing with the full name, so `prompt + " " + answer + "."` is a bio
  sentence; each value being one word, a greedy completion is scored by exact match of its first word.

`mix` interleaves the training text with another corpus (the embedded one) at a ratio of characters.

Held-out entities are not `prepare`'s held-out split: `m3jax.data.prepare` holds out whole *documents* of the
training text by a hash of their doc id (train.jsonl's "id": `entity:<i>:<j>`, or the mixed-in document's), so
some bios of training entities land in its held-out split instead (an entity keeps its facts in training while any
of its bios is in the train split), and held-out entities, having no bios, are in neither: they exist only in the
knowledge base and the cloze items.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from etils import epath

from m3jax.data.corpus import Document


@dataclasses.dataclass(frozen=True)
class Attribute:
    """One fact of an entity: its name, how bios state it ("{s}": the subject, "{v}": the value) and its values.

    `values` is a fixed word list, or None for words generated per seed (`GENERATED_VOCAB_SIZE` of them)."""

    name: str
    phrasings: tuple[str, ...]
    values: tuple[str, ...] | None = None

    @property
    def cloze(self) -> str:
        """The cloze prompt template ("{s}": the full name): the first phrasing up to the value."""
        return self.phrasings[0][: self.phrasings[0].index(" {v}")]


GENERATED_VOCAB_SIZE = 200  # cities, employers and pet names generated per seed
FIRST_NAMES = 200  # the pool of first names entities share; surnames are unique
MAX_WORD_CHARS = 8  # of a generated word: bounds the tokens of a knowledge-base reference
YEARS = tuple(str(y) for y in range(1800, 2000))

ATTRIBUTES = (
    Attribute("birth_year", ("{s} was born in the year {v}.", "{s} came into the world in {v}.",
                             "The year {v} saw the birth of {s}."), YEARS),
    Attribute("birth_city", ("{s} was born in the city of {v}.", "{s}'s hometown was {v}.",
                             "The birthplace of {s} was {v}.")),
    Attribute("employer", ("{s} worked for {v}.", "{s} was employed by the firm {v}.",
                           "For many years, {s} held a position at {v}.")),
    Attribute("field", ("{s} worked in the field of {v}.", "{s} devoted a career to {v}.", "{s} was trained in {v}."),
              ("acoustics", "agronomy", "anthropology", "archaeology", "architecture", "astronomy", "bookbinding",
               "botany", "cartography", "chemistry", "economics", "engineering", "forestry", "geology",
               "glassmaking", "history", "horticulture", "journalism", "law", "linguistics", "mathematics",
               "medicine", "metallurgy", "meteorology", "navigation", "oceanography", "optics", "painting",
               "pharmacy", "philosophy", "physics", "poetry", "psychology", "sculpture", "sociology", "statistics",
               "surveying", "theology", "typography", "zoology")),
    Attribute("colour", ("{s}'s favourite colour was {v}.", "{s} liked the colour {v} more than any other.",
                         "Of all colours, {s} preferred {v}."),
              ("amber", "azure", "beige", "bronze", "burgundy", "charcoal", "cobalt", "copper", "coral", "crimson",
               "cyan", "emerald", "gold", "indigo", "ivory", "jade", "khaki", "lavender", "lilac", "magenta",
               "maroon", "mauve", "navy", "ochre", "rust", "scarlet", "silver", "teal", "turquoise", "violet")),
    Attribute("instrument", ("{s} played the {v}.", "{s} was a keen player of the {v}.",
                             "In the evenings, {s} practised the {v}."),
              ("accordion", "bagpipes", "banjo", "bassoon", "celesta", "cello", "clarinet", "dulcimer", "flute",
               "guitar", "harmonica", "harp", "harpsichord", "lute", "mandolin", "marimba", "oboe", "organ",
               "piano", "piccolo", "saxophone", "sitar", "trombone", "trumpet", "tuba", "ukulele", "viola",
               "violin", "xylophone", "zither")),
    Attribute("pet", ("{s} owned a pet {v}.", "{s} kept a {v} as a pet.", "At home, {s} looked after a {v}."),
              ("budgie", "canary", "cat", "chinchilla", "dog", "ferret", "gecko", "goat", "goldfish", "hamster",
               "hedgehog", "lizard", "mouse", "parrot", "pony", "rabbit", "rat", "snake", "toad", "tortoise")),
    Attribute("pet_name", ("{s}'s pet was named {v}.", "{s} called the pet {v}.",
                           "The pet of {s} answered to the name {v}.")),
    Attribute("food", ("{s}'s favourite food was {v}.", "{s} ate {v} whenever possible.",
                       "No dish pleased {s} more than {v}."),
              ("apricots", "cheesecake", "cherries", "chowder", "couscous", "crumpets", "curry", "dumplings",
               "falafel", "figs", "flatbread", "gnocchi", "goulash", "herring", "hummus", "lasagne", "lentils",
               "mackerel", "meatballs", "muffins", "mussels", "noodles", "olives", "omelettes", "oysters",
               "paella", "pancakes", "pickles", "plums", "polenta", "porridge", "pretzels", "ravioli", "risotto",
               "sardines", "sausages", "scones", "strudel", "trout", "waffles")),
    Attribute("sport", ("{s}'s favourite sport was {v}.", "{s} took part in {v} contests.",
                        "{s} spent free afternoons on {v}."),
              ("archery", "badminton", "baseball", "bowling", "boxing", "canoeing", "climbing", "cricket",
               "croquet", "curling", "cycling", "fencing", "football", "golf", "gymnastics", "handball", "hockey",
               "judo", "karate", "lacrosse", "polo", "rowing", "rugby", "sailing", "skiing", "squash", "swimming",
               "tennis", "volleyball", "wrestling")),
)
ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)

OPENINGS = ("", "This is the story of {name}.", "Here is what is known about {name}.",
            "{name} is the subject of this short account.", "Few people today remember {name}.")
KB_TEMPLATE = (
    "{name} (born {birth_year} in {birth_city}). Employer: {employer}. Field: {field}. Colour: {colour}. "
    "Instrument: {instrument}. Pet: a {pet} named {pet_name}. Food: {food}. Sport: {sport}."
)
MIN_ATTRIBUTES = 2  # an entry opens "<name> (born <year> in <city>)": the first two attributes are always stated


def kb_template(num_attributes: int) -> str:
    """The knowledge-base entry of an entity with the first `num_attributes` of ATTRIBUTES: `KB_TEMPLATE` up to the
    end of the sentence stating the last one (all of it for every attribute). Raises ValueError for a count outside
    [MIN_ATTRIBUTES, len(ATTRIBUTES)] or one that ends inside a sentence stating two ("Pet: a {pet} named ...")."""
    if not MIN_ATTRIBUTES <= num_attributes <= len(ATTRIBUTES):
        raise ValueError(f"num_attributes must be in [{MIN_ATTRIBUTES}, {len(ATTRIBUTES)}], got {num_attributes}")
    last = "{" + ATTRIBUTES[num_attributes - 1].name + "}"
    end = KB_TEMPLATE.index(".", KB_TEMPLATE.index(last)) + 1
    template = KB_TEMPLATE[:end]
    if num_attributes < len(ATTRIBUTES) and "{" + ATTRIBUTES[num_attributes].name + "}" in template:
        raise ValueError(f"num_attributes={num_attributes} ends inside the sentence {template.rsplit('.', 2)[-2]!r} "
                         f"that also states {ATTRIBUTES[num_attributes].name}; take one more or one fewer")
    return template

# Syllables of generated words: onset + vowel + coda; a word is 2 or 3 of them, capitalised.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr",
           "th", "st", "sk", "vr", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "m", "k", "x")


@dataclasses.dataclass(frozen=True)
class Entity:
    """A fictional person: entity `index`, its names, its value of every attribute, and whether it is held out."""

    index: int
    first_name: str
    surname: str
    values: dict[str, str]  # attribute name -> value, in ATTRIBUTES order
    heldout: bool

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.surname}"


@dataclasses.dataclass(frozen=True)
class Entities:
    """The entities of one seed, in index order, and every attribute's value vocabulary."""

    seed: int
    entities: tuple[Entity, ...]
    vocab: dict[str, tuple[str, ...]]  # attribute name -> its possible values
    attributes: tuple[Attribute, ...] = ATTRIBUTES  # what every entity has: the first ones of ATTRIBUTES

    @property
    def train(self) -> tuple[Entity, ...]:
        return tuple(e for e in self.entities if not e.heldout)

    @property
    def heldout(self) -> tuple[Entity, ...]:
        return tuple(e for e in self.entities if e.heldout)


def num_heldout(num_entities: int, heldout_fraction: float) -> int:
    """How many of `num_entities` are held out: the nearest integer to the fraction."""
    return round(num_entities * heldout_fraction)


def generate(num_entities: int, heldout_fraction: float, seed: int,
             num_attributes: int = len(ATTRIBUTES)) -> Entities:
    """`num_entities` fictional people, `num_heldout(...)` of them held out, as a pure function of the arguments,
    each with the first `num_attributes` of ATTRIBUTES (`kb_template` says which counts are allowed).

    One numpy PCG64 stream seeded by `seed` draws, in order: the generated words (first names, surnames, cities,
    employers, pet names; all distinct and unlike any listed value), the held-out set, each entity's first name,
    then the training entities' values (uniform over each vocabulary) and the held-out entities' values (uniform
    over the values training entities hold, so every held-out answer is also some training entity's answer).
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    heldout_count = num_heldout(num_entities, heldout_fraction)
    if num_entities - heldout_count < 1:
        raise ValueError(f"num_entities={num_entities} at heldout_fraction={heldout_fraction} holds out all "
                         f"{heldout_count}: no training entity remains")
    kb_template(num_attributes)  # validates the count
    attributes = ATTRIBUTES[:num_attributes]
    rng = np.random.default_rng(seed)
    taken = {v.lower() for a in ATTRIBUTES if a.values for v in a.values}
    first_names = _words(rng, FIRST_NAMES, 2, taken)
    surnames = _words(rng, num_entities, 3, taken)
    vocab = {a.name: a.values or tuple(sorted(_words(rng, GENERATED_VOCAB_SIZE, 2, taken))) for a in ATTRIBUTES}
    heldout = np.zeros(num_entities, bool)
    heldout[rng.choice(num_entities, heldout_count, replace=False)] = True
    firsts = rng.integers(len(first_names), size=num_entities)
    values: list[dict[str, str]] = [{} for _ in range(num_entities)]
    for i in np.flatnonzero(~heldout):
        for a in attributes:
            values[i][a.name] = vocab[a.name][rng.integers(len(vocab[a.name]))]
    for a in attributes:
        seen = sorted({values[i][a.name] for i in np.flatnonzero(~heldout)})
        for i in np.flatnonzero(heldout):
            values[i][a.name] = seen[rng.integers(len(seen))]
    entities = tuple(
        Entity(i, first_names[firsts[i]], surnames[i], {a.name: values[i][a.name] for a in attributes},
               bool(heldout[i]))
        for i in range(num_entities)
    )
    return Entities(seed, entities, {a.name: vocab[a.name] for a in attributes}, attributes)


def _words(rng: np.random.Generator, count: int, syllables: int, taken: set[str]) -> list[str]:
    """`count` new capitalised words of at most MAX_WORD_CHARS, none in `taken` (lower case; they are added to it):
    of `syllables` syllables, or when that is over 2, of one fewer half of the time."""
    words = []
    while len(words) < count:
        n = syllables - int(rng.integers(2)) if syllables > 2 else syllables
        word = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                       + _CODAS[rng.integers(len(_CODAS))] for _ in range(n))
        if len(word) <= MAX_WORD_CHARS and word not in taken:
            taken.add(word)
            words.append(word.capitalize())
    return words


# ------------------------------------------------------------------------------------------------------ texts
def bio(entity: Entity, seed: int, j: int) -> str:
    """Biography `j` of `entity`: an opening, then every attribute once, in a random order and phrasing, its
    subject the full name or the surname (the full name in the first sentence). Drawn from (seed, index, j)
    alone, so bio j does not depend on how many bios or entities there are."""
    rng = np.random.default_rng([seed, entity.index, j])
    opening = OPENINGS[rng.integers(len(OPENINGS))]
    sentences = [opening.format(name=entity.name)] if opening else []
    attributes = [a for a in ATTRIBUTES if a.name in entity.values]
    for k in rng.permutation(len(attributes)):
        attribute = attributes[k]
        subject = entity.name if not sentences or rng.integers(2) else entity.surname
        phrasing = attribute.phrasings[rng.integers(len(attribute.phrasings))]
        sentences.append(phrasing.format(s=subject, v=entity.values[attribute.name]))
    return " ".join(sentences)


def training_documents(entities: Entities, bios_per_entity: int) -> list[Document]:
    """`bios_per_entity` bios of every training entity (none of the held-out ones), as `entity:<i>:<j>`."""
    if bios_per_entity < 1:
        raise ValueError(f"bios_per_entity must be positive, got {bios_per_entity}")
    return [Document(f"entity:{e.index}:{j}", bio(e, entities.seed, j))
            for e in entities.train for j in range(bios_per_entity)]


def knowledge_texts(entities: Entities) -> list[str]:
    """One knowledge-base reference per entity, training and held-out, in index order (`kb_template`)."""
    template = kb_template(len(entities.attributes))
    return [template.format(name=e.name, **e.values) for e in entities.entities]


def cloze_items(entities: Entities) -> list[dict[str, Any]]:
    """Per entity (index order) and attribute (ATTRIBUTES order): the prompt, the answer and whether the entity is
    held out. The prompt ends right before the value; the completion `" " + answer` continues it."""
    return [{"entity": e.index, "name": e.name, "attribute": a.name, "prompt": a.cloze.format(s=e.name),
             "answer": e.values[a.name], "heldout": e.heldout}
            for e in entities.entities for a in entities.attributes]


def mix(entity_docs: Sequence[Document], other_docs: Sequence[Document], ratio: float,
        seed: int) -> list[Document]:
    """Every entity document and a seeded random subset of `other_docs`, shuffled together, so that entity text is
    `ratio` of the characters (other documents are added until their characters reach
    `entity chars * (1 - ratio) / ratio`; the last one added may overshoot by less than its length).

    Raises ValueError when `other_docs` hold too few characters for `ratio`, naming the smallest ratio they allow.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"mix ratio must be in (0, 1], got {ratio}")
    entity_chars = sum(len(d.text) for d in entity_docs)
    wanted = entity_chars * (1.0 - ratio) / ratio
    available = sum(len(d.text) for d in other_docs)
    if wanted > available:
        smallest = entity_chars / (entity_chars + available)
        raise ValueError(f"mix ratio {ratio} needs {wanted:.0f} characters of other text and the corpus has "
                         f"{available}: the smallest ratio it allows is {smallest:.4f}")
    rng = np.random.default_rng(seed)
    chosen, chars = [], 0
    for k in rng.permutation(len(other_docs)):
        if chars >= wanted:
            break
        chosen.append(other_docs[k])
        chars += len(other_docs[k].text)
    docs = [*entity_docs, *chosen]
    return [docs[k] for k in rng.permutation(len(docs))]


# ---------------------------------------------------------------------------------------------------- files
def metadata(entities: Entities, train_docs: Sequence[Document], bios_per_entity: int,
             mix_ratio: float) -> dict[str, Any]:
    """What `write` puts in entities.json: settings, counts, each attribute's vocabulary size and chance, the
    training text's make-up, and every entity.

    Chance per attribute: `uniform` = 1 / vocabulary size; `majority` = the share of held-out entities whose value
    is the training entities' most frequent one (the best a model that ignores the entity can do)."""
    attributes = {}
    for a in entities.attributes:
        counts: dict[str, int] = {}
        for e in entities.train:
            counts[e.values[a.name]] = counts.get(e.values[a.name], 0) + 1
        top = max(sorted(counts), key=counts.__getitem__)
        heldout = entities.heldout
        attributes[a.name] = {
            "vocab_size": len(entities.vocab[a.name]), "uniform_chance": 1 / len(entities.vocab[a.name]),
            "majority_chance": sum(e.values[a.name] == top for e in heldout) / len(heldout) if heldout else None,
            "cloze": a.cloze, "phrasings": len(a.phrasings)}
    entity_docs = [d for d in train_docs if d.doc_id.startswith("entity:")]
    entity_chars, total_chars = sum(len(d.text) for d in entity_docs), sum(len(d.text) for d in train_docs)
    return {
        "seed": entities.seed, "num_entities": len(entities.entities), "num_train": len(entities.train),
        "num_heldout": len(entities.heldout), "bios_per_entity": bios_per_entity, "mix_ratio": mix_ratio,
        "attributes": attributes, "openings": len(OPENINGS),
        "kb_template": kb_template(len(entities.attributes)),
        "train_text": {"documents": len(train_docs), "entity_documents": len(entity_docs),
                       "characters": total_chars, "entity_characters": entity_chars,
                       "entity_char_fraction": entity_chars / total_chars},
        "entities": [{"index": e.index, "name": e.name, "heldout": e.heldout, "values": e.values}
                     for e in entities.entities],
    }


def write(out_dir: str | os.PathLike, entities: Entities, train_docs: Sequence[Document], bios_per_entity: int,
          mix_ratio: float) -> dict[str, Any]:
    """Writes the task to `out_dir`; returns the metadata:
    train.jsonl      `{"text", "id"}` per training document (what `load_corpus` and prepare_data read),
    knowledge.jsonl  `{"text", "entity"}` per entity, in index order (what `load_references` reads),
    cloze.jsonl      one `cloze_items` item per line,
    entities.json    `metadata(...)`.
    `out_dir` may be a `gs://` URL."""
    out = epath.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", ({"text": d.text, "id": d.doc_id} for d in train_docs))
    _write_jsonl(out / "knowledge.jsonl",
                 ({"text": t, "entity": i} for i, t in enumerate(knowledge_texts(entities))))
    _write_jsonl(out / "cloze.jsonl", cloze_items(entities))
    meta = metadata(entities, train_docs, bios_per_entity, mix_ratio)
    (out / "entities.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return meta


def _write_jsonl(path: epath.Path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

