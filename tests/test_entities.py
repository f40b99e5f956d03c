"""The fictional-entities knowledge task: what tools/make_entities.py writes is the library's output, reproducible
in another process; held-out entities are absent from the training text and training entities are there with
every fact (both read off the written files, not the generator's bookkeeping); each knowledge-base entry is one
reference of the session tokenizer, close to ref_len; the cloze answers are the knowledge base's values."""

import collections
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from m3jax.config import base_config
from m3jax.data import entities
from m3jax.data.corpus import Document, embedded_corpus, load_corpus
from m3jax.data.tokenizer import Tokenizer
from m3jax.memory.knowledge import load_references

# A small task: 60 entities, 15 held out, 3 bios each, mixed half and half (by characters) with real text.
SETTINGS = {"num_entities": 60, "heldout_fraction": 0.25, "seed": 3, "bios_per_entity": 3, "mix_ratio": 0.5}
# A knowledge-base entry, parsed without the library's template: name and every attribute's value.
KB_ENTRY = re.compile(
    r"(?P<name>\w+ \w+) \(born (?P<birth_year>\d{4}) in (?P<birth_city>\w+)\)\. Employer: (?P<employer>\w+)\. "
    r"Field: (?P<field>\w+)\. Colour: (?P<colour>\w+)\. Instrument: (?P<instrument>\w+)\. "
    r"Pet: a (?P<pet>\w+) named (?P<pet_name>\w+)\. Food: (?P<food>\w+)\. Sport: (?P<sport>\w+)\."
)
KB_FIELD = re.compile(r"\b(Employer|Field|Colour|Instrument|Pet|Food|Sport): ")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def make_entities(*flags: str, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "tools/make_entities.py", *flags], cwd=REPO, text=True,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory) -> str:
    """Real text to mix the bios with: 100 embedded-corpus documents of under 10,000 characters, as JSONL."""
    path = tmp_path_factory.mktemp("entities_corpus") / "corpus.jsonl"
    docs = [d for d in embedded_corpus() if len(d.text) < 10_000][:100]
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def written(corpus_file, tmp_path_factory) -> Path:
    """tools/make_entities.py's output for SETTINGS, run in another process with another string-hash salt."""
    out = tmp_path_factory.mktemp("entities")
    flags = [f"--{k}={v}" for k, v in SETTINGS.items()]
    proc = make_entities(f"--out={out}", f"--corpus={corpus_file}", *flags,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "15 held out" in stdout and f"wrote {out}" in stdout, stdout
    return out


def kb_entries(out: Path) -> list[dict[str, str]]:
    """knowledge.jsonl parsed by KB_ENTRY, in line order."""
    entries = []
    for line, row in enumerate(read_jsonl(out / "knowledge.jsonl")):
        match = KB_ENTRY.fullmatch(row["text"])
        assert match, f"knowledge.jsonl line {line + 1} is not a knowledge-base entry: {row['text']!r}"
        entries.append(match.groupdict())
    return entries


def heldout_leaks(train_texts: list[str], heldout: list[dict]) -> list[str]:
    """What of the held-out entities (cloze items) the training text states: their full names, surnames (as
    words) and cloze statements "<prompt> <answer>"."""
    text = "\n".join(train_texts)
    leaks = []
    for item in heldout:
        surname = item["name"].split()[1]
        for needle, found in ((item["name"], item["name"] in text),
                              (surname, re.search(rf"\b{surname}\b", text) is not None),
                              (f"{item['prompt']} {item['answer']}", f"{item['prompt']} {item['answer']}" in text)):
            if found:
                leaks.append(needle)
    return sorted(set(leaks))


def missing_facts(train_texts: list[str], kb: list[dict[str, str]], bios_per_entity: int) -> list[str]:
    """For each knowledge-base entity whose full name is in the training text (its bios): "<name>: <n> bios" when
    it has not `bios_per_entity` of them, and "<name> bio <j>: <attribute>" for each attribute whose value is in no
    sentence of its bio j that names it (by full name or surname)."""
    missing = []
    for entry in kb:
        name, surname = entry["name"], entry["name"].split()[1]
        bios = [t for t in train_texts if name in t]
        if bios and len(bios) != bios_per_entity:
            missing.append(f"{name}: {len(bios)} bios")
        for j, bio in enumerate(bios):
            sentences = [s for s in re.split(r"(?<=\.) ", bio) if re.search(rf"\b{surname}\b", s)]
            missing.extend(f"{name} bio {j}: {attribute}" for attribute in entities.ATTRIBUTE_NAMES
                           if not any(re.search(rf"\b{entry[attribute]}\b", s) for s in sentences))
    return missing


def test_cli_writes_the_library_output_reproducibly(written, corpus_file):
    """Each file of the CLI's run (another process, another string-hash salt) equals the library's output here,
    and prepare_data's corpus reader reads train.jsonl as those documents; another seed gives other entities."""
    task = entities.generate(SETTINGS["num_entities"], SETTINGS["heldout_fraction"], SETTINGS["seed"])
    bios = entities.training_documents(task, SETTINGS["bios_per_entity"])
    train = entities.mix(bios, load_corpus(corpus_file), SETTINGS["mix_ratio"], SETTINGS["seed"])
    assert [(r["id"], r["text"]) for r in read_jsonl(written / "train.jsonl")] == [(d.doc_id, d.text) for d in train]
    assert [d.text for d in load_corpus(str(written / "train.jsonl"))] == [d.text for d in train]
    assert [r["text"] for r in read_jsonl(written / "knowledge.jsonl")] == entities.knowledge_texts(task)
    assert read_jsonl(written / "cloze.jsonl") == entities.cloze_items(task)
    meta = json.loads((written / "entities.json").read_text())
    assert meta == json.loads(json.dumps(entities.metadata(task, train, SETTINGS["bios_per_entity"],
                                                           SETTINGS["mix_ratio"])))
    other = entities.generate(SETTINGS["num_entities"], SETTINGS["heldout_fraction"], SETTINGS["seed"] + 1)
    assert {e.name for e in other.entities}.isdisjoint(e.name for e in task.entities)
    assert [e.heldout for e in other.entities] != [e.heldout for e in task.entities]


def test_heldout_entities_are_absent_from_the_training_text(written):
    """No held-out entity's full name, surname or cloze statement is in train.jsonl, while every training entity's
    full name is; the same scan of a training text that also holds held-out bios finds them (a negative control)."""
    train_texts = [r["text"] for r in read_jsonl(written / "train.jsonl")]
    cloze = read_jsonl(written / "cloze.jsonl")
    heldout = [item for item in cloze if item["heldout"]]
    held_names = {item["name"] for item in heldout}
    assert len(held_names) == entities.num_heldout(SETTINGS["num_entities"], SETTINGS["heldout_fraction"]) == 15
    assert heldout_leaks(train_texts, heldout) == []
    text = "\n".join(train_texts)
    assert all(item["name"] in text for item in cloze if not item["heldout"])

    task = entities.generate(SETTINGS["num_entities"], SETTINGS["heldout_fraction"], SETTINGS["seed"])
    leaky = dataclasses.replace(task, entities=tuple(dataclasses.replace(e, heldout=False) for e in task.entities))
    leaky_texts = [d.text for d in entities.training_documents(leaky, 1)]
    assert set(heldout_leaks(leaky_texts, heldout)) >= held_names


def test_training_entities_have_every_fact_in_the_training_text(written):
    """Each training entity of knowledge.jsonl has bios_per_entity distinct bios in train.jsonl, and each of its
    values is in a sentence of each bio that names it; no bio is written in the knowledge base's record style. A bio
    that drops one attribute's sentence is caught (a negative control)."""
    train_texts = [r["text"] for r in read_jsonl(written / "train.jsonl")]
    bio_texts = [r["text"] for r in read_jsonl(written / "train.jsonl") if r["id"].startswith("entity:")]
    kb = kb_entries(written)
    held_names = {item["name"] for item in read_jsonl(written / "cloze.jsonl") if item["heldout"]}
    training_kb = [entry for entry in kb if entry["name"] not in held_names]
    assert len(training_kb) == 45
    assert missing_facts(train_texts, training_kb, SETTINGS["bios_per_entity"]) == []
    assert sum(entry["name"] in t for entry in training_kb for t in train_texts) == len(bio_texts) == 45 * 3
    assert len(set(bio_texts)) == len(bio_texts)
    assert not any(KB_FIELD.search(t) for t in bio_texts)

    first = training_kb[0]
    k = next(k for k, t in enumerate(train_texts) if first["name"] in t)  # its bio 0
    dropped = list(train_texts)
    dropped[k] = " ".join(s for s in re.split(r"(?<=\.) ", dropped[k]) if first["employer"] not in s)
    assert missing_facts(dropped, training_kb, SETTINGS["bios_per_entity"]) == [f"{first['name']} bio 0: employer"]


def test_cloze_items_ask_the_knowledge_base_values(written):
    """cloze.jsonl has one item per entity and attribute; its answer is the value knowledge.jsonl states, its
    prompt names the entity and ends right before the answer (prompt + " " + answer is the first bio phrasing)."""
    kb = kb_entries(written)
    cloze = read_jsonl(written / "cloze.jsonl")
    assert len(kb) == SETTINGS["num_entities"]
    assert [(item["entity"], item["attribute"]) for item in cloze] == [
        (i, a) for i in range(len(kb)) for a in entities.ATTRIBUTE_NAMES]
    for item in cloze:
        entry = kb[item["entity"]]
        assert item["name"] == entry["name"] and item["answer"] == entry[item["attribute"]], item
        assert re.match(rf"{entry['name']}\b", item["prompt"]) and not item["prompt"].endswith(" "), item
        assert item["answer"] not in item["prompt"].split(), item
    phrasings = {a.name: a.phrasings[0] for a in entities.ATTRIBUTES}
    assert all(f"{item['prompt']} {item['answer']}." == phrasings[item["attribute"]].format(
        s=item["name"], v=item["answer"]) for item in cloze)


def test_names_and_values_do_not_give_answers_away():
    """Names are unique and share no word with any value; every value is one word of one attribute's vocabulary;
    first names are shared, and every held-out entity's value is also a training entity's (no value identifies an
    entity by being new); the chance metadata matches the vocabularies."""
    task = entities.generate(1000, 0.2, 0)
    names = [e.name for e in task.entities]
    assert len(set(names)) == len(names) and len({e.surname for e in task.entities}) == len(names)
    vocab_words = [v.lower() for a in entities.ATTRIBUTE_NAMES for v in task.vocab[a]]
    assert len(set(vocab_words)) == len(vocab_words)
    assert all(re.fullmatch(r"\w+", v) for v in vocab_words)
    name_words = {w.lower() for e in task.entities for w in (e.first_name, e.surname)}
    assert name_words.isdisjoint(vocab_words)
    assert len({e.first_name for e in task.entities}) < len(names) // 2
    small = entities.generate(12, 0.5, 0)  # 6 training entities: most values of a vocabulary are unseen
    for t in (task, small):
        for a in entities.ATTRIBUTE_NAMES:
            train_values = {e.values[a] for e in t.train}
            assert all(e.values[a] in train_values for e in t.heldout), a
            assert all(e.values[a] in t.vocab[a] for e in t.entities), a
    meta = entities.metadata(task, entities.training_documents(task, 1), 1, 1.0)["attributes"]
    for a in entities.ATTRIBUTE_NAMES:
        size = len(task.vocab[a])
        assert meta[a]["vocab_size"] == size and meta[a]["uniform_chance"] == 1 / size
        assert size >= 20, f"{a}: chance 1/{size} is too high"
        top = collections.Counter(sorted(e.values[a] for e in task.train)).most_common(1)[0][0]
        assert meta[a]["majority_chance"] == sum(e.values[a] == top for e in task.heldout) / 200 < 0.1, a


def test_every_knowledge_entry_is_one_reference_near_ref_len(lm_data, tmp_path):
    """The 1000 default entities' knowledge base, cut by load_references with the session tokenizer at the
    default memory.ref_len, gives exactly one reference per entity, each at least 70% of ref_len."""
    ref_len = base_config().memory.ref_len
    path = tmp_path / "knowledge.jsonl"
    texts = entities.knowledge_texts(entities.generate(1000, 0.2, 0))
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    refs = load_references(str(path), Tokenizer(Path(lm_data).parent / "spm.model"), ref_len)
    assert len(refs) == len(texts), f"{len(refs) - len(texts)} entries were cut into two references"
    shortest, longest = int(refs.lengths.min()), int(refs.lengths.max())
    assert 0.7 * ref_len <= shortest and longest <= ref_len, f"references of {shortest}..{longest} tokens"


def test_fewer_attributes_give_shorter_entries_of_those_attributes_only():
    """num_attributes=N: every entity has the first N attributes (names and split as with all of them), the entry
    states exactly those and stops there, bios and cloze items speak of nothing else; counts that would cut an
    entry's sentence in two are refused by name."""
    full, four = entities.generate(100, 0.2, 0), entities.generate(100, 0.2, 0, num_attributes=4)
    names = entities.ATTRIBUTE_NAMES[:4]
    assert full == entities.generate(100, 0.2, 0, num_attributes=len(entities.ATTRIBUTES))
    assert [e.name for e in four.entities] == [e.name for e in full.entities]
    assert [e.heldout for e in four.entities] == [e.heldout for e in full.entities]
    for e in four.entities:
        assert tuple(e.values) == names
    for e, text in zip(four.entities, entities.knowledge_texts(four), strict=True):
        assert text == f"{e.name} (born {e.values['birth_year']} in {e.values['birth_city']}). Employer: " \
                       f"{e.values['employer']}. Field: {e.values['field']}."
    items = entities.cloze_items(four)
    assert len(items) == 4 * 100 and {it["attribute"] for it in items} == set(names)
    for e in four.train[:20]:
        text = entities.bio(e, 0, 0)
        assert all(v in text for v in e.values.values())
        assert text.count(".") <= 5  # an opening and 4 facts
    for bad, says in ((1, r"must be in \[2, 10\]"), (7, "also states pet_name"), (11, "must be in")):
        with pytest.raises(ValueError, match=says):
            entities.generate(10, 0.2, 0, num_attributes=bad)


def test_mix_keeps_every_bio_at_the_ratio_of_characters():
    """mix keeps each entity document once, adds distinct other documents until entity text is `ratio` of the
    characters (within one other document), is seeded, and refuses a ratio the other text cannot meet."""
    bios = [Document(f"entity:{i}:0", "b" * (300 + 7 * i)) for i in range(40)]
    other = [Document(f"other:{i}", "o" * (100 + 13 * i)) for i in range(200)]
    bio_chars = sum(len(d.text) for d in bios)
    for ratio in (0.2, 0.5, 0.9):
        mixed = entities.mix(bios, other, ratio, seed=1)
        ids = [d.doc_id for d in mixed]
        assert len(set(ids)) == len(ids) and set(ids) >= {d.doc_id for d in bios}
        other_chars = sum(len(d.text) for d in mixed) - bio_chars
        wanted = bio_chars * (1 - ratio) / ratio
        assert wanted <= other_chars < wanted + max(len(d.text) for d in other), ratio
        assert ids[:40] != [d.doc_id for d in bios]  # shuffled together
    assert entities.mix(bios, other, 0.5, seed=1) == entities.mix(bios, other, 0.5, seed=1)
    assert entities.mix(bios, other, 0.5, seed=1) != entities.mix(bios, other, 0.5, seed=2)
    assert sorted(d.doc_id for d in entities.mix(bios, other, 1.0, seed=1)) == sorted(d.doc_id for d in bios)
    few = other[:40]
    smallest = bio_chars / (bio_chars + sum(len(d.text) for d in few))
    with pytest.raises(ValueError, match=f"smallest ratio it allows is {smallest:.4f}"):
        entities.mix(bios, few, 0.2, seed=1)
    with pytest.raises(ValueError, match="must be in"):
        entities.mix(bios, other, 0.0, seed=1)


def test_bad_settings_are_refused_by_name(corpus_file):
    """Bad flags are refused at parsing, naming the flag; settings that parse but cannot be met (every entity
    held out, too little text for the ratio) stop the tool with the library's message."""
    cases = [("--mix_ratio=0", "Flags parsing error: flag --mix_ratio=0"),
             ("--heldout_fraction=1", "Flags parsing error: flag --heldout_fraction=1"),
             ("--bios_per_entity=0", "Flags parsing error: flag --bios_per_entity=0"),
             ("--num_entities=2 --heldout_fraction=0.9", "no training entity remains"),
             (f"--corpus={corpus_file} --mix_ratio=0.01", "the smallest ratio it allows is")]
    procs = [make_entities("--out=/nonexistent/entities", *flags.split()) for flags, _ in cases]  # in parallel
    for (flags, says), proc in zip(cases, procs, strict=True):
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0 and says in stderr, f"{flags}: {stderr[-2000:]}"
    assert not os.path.exists("/nonexistent/entities")
