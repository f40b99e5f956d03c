"""Writes the fictional-entities knowledge task (m3jax/data/entities.py) for the continued stage.

    python tools/make_entities.py --out=runs/demo/entities
    python tools/prepare_data.py --corpus=runs/demo/entities/train.jsonl --tokenizer=... --out=...

Writes OUT/train.jsonl (bios of the training entities mixed with --corpus at --mix_ratio of the characters),
OUT/knowledge.jsonl (one reference per entity, held-out ones included: the --knowledge of write_memory),
OUT/cloze.jsonl (a prompt and answer per entity and attribute) and OUT/entities.json (settings, counts, chance).
prepare_data's --heldout_fraction holds out whole documents of train.jsonl by a hash of their "id": that is
a perplexity split, separate from the held-out entities, which have no document in train.jsonl at all.
"""

import sys

from absl import app, flags

from m3jax.data import entities
from m3jax.data.corpus import load_corpus

_OUT = flags.DEFINE_string("out", None, "Output directory (local, or a gs:// URL).", required=True)
_NUM_ENTITIES = flags.DEFINE_integer("num_entities", 1000, "Fictional people generated.", lower_bound=2)
_HELDOUT_FRACTION = flags.DEFINE_float("heldout_fraction", 0.2,
                                       "Fraction of the entities held out: in the knowledge base only.")
flags.register_validator("heldout_fraction", lambda f: 0.0 <= f < 1.0,
                         message="--heldout_fraction must be in [0, 1): training entities must remain")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the entities, their bios and the mixing.")
_NUM_ATTRIBUTES = flags.DEFINE_integer("num_attributes", len(entities.ATTRIBUTES),
                                       "Attributes per entity: the first N of m3jax.data.entities.ATTRIBUTES (the "
                                       "knowledge-base entry states them all: fewer, shorter references).")
_BIOS_PER_ENTITY = flags.DEFINE_integer("bios_per_entity", 4, "Biographies per training entity.", lower_bound=1)
_MIX_RATIO = flags.DEFINE_float("mix_ratio", 0.5, "Fraction of train.jsonl's characters that are bios, in (0, 1].")
flags.register_validator("mix_ratio", lambda r: 0.0 < r <= 1.0, message="--mix_ratio must be in (0, 1]")
_CORPUS = flags.DEFINE_string("corpus", "embedded", 'Text mixed with the bios: "embedded", or text/JSONL paths.')


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        task = entities.generate(_NUM_ENTITIES.value, _HELDOUT_FRACTION.value, _SEED.value,
                                 _NUM_ATTRIBUTES.value)
        bios = entities.training_documents(task, _BIOS_PER_ENTITY.value)
        other = load_corpus(_CORPUS.value) if _MIX_RATIO.value < 1.0 else []
        train = entities.mix(bios, other, _MIX_RATIO.value, _SEED.value)
    except (OSError, ValueError) as e:  # a corpus that cannot be read, or too small for the ratio
        sys.exit(f"make_entities: {e}")
    meta = entities.write(_OUT.value, task, train, _BIOS_PER_ENTITY.value, _MIX_RATIO.value)
    text = meta["train_text"]
    print(f"{meta['num_entities']} entities: {meta['num_train']} training, {meta['num_heldout']} held out "
          f"(knowledge base only)")
    print(f"train.jsonl: {text['entity_documents']} bios + {text['documents'] - text['entity_documents']} other "
          f"documents, {text['characters']} characters, {text['entity_char_fraction']:.3f} of them bios")
    print("attribute   vocabulary  chance (1/vocab)  majority (held out)")
    for name, a in meta["attributes"].items():
        majority = "-" if a["majority_chance"] is None else f"{a['majority_chance']:.3f}"
        print(f"{name:<11} {a['vocab_size']:>10}  {a['uniform_chance']:>16.4f}  {majority:>19}")
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
