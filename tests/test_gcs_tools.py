"""The tools with gs:// paths (tests/gcs_fixtures.py's local GCS server): each writes to a bucket what it writes to
local disk, and reads from a bucket what it reads there, through the libraries' own gs:// layers; where a format
must stay local, the error names the URL and says why.

The checkpoint is the session's reference run (tests/conftest.py), copied into the bucket object by object rather
than trained again. Every tool runs twice, on local paths and on bucket paths (at once: two processes), and the
outputs are compared. The tools run in a scratch directory, where a tool that took a URL for a local path would
leave a directory named `gs:` (checked) rather than in the repository.
"""

import json
import subprocess
import sys
from pathlib import Path

import fsspec
import jax
import numpy as np
import pytest
from conftest import REPO, bank_files, cli_env
from etils import epath

pytest_plugins = ("gcs_fixtures",)  # the `gcs` fixture: a gs:// base on a local GCS server

CONFIG = f"--config={REPO}/tests/lm_test_config.py"
KB = [{"text": "The quick brown fox jumps over the lazy dog. " * 6, "id": "fox"},
      {"text": "A memory bank holds the key-value pairs of references. " * 4, "id": "bank"}]


def _start(cwd: Path, tool: str, *args: str) -> subprocess.Popen:
    """tools/<tool>.py with `args`, started in `cwd` (made if missing)."""
    cwd.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, f"{REPO}/tools/{tool}.py", *args], cwd=cwd, env=cli_env(cwd),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, ok: bool = True) -> tuple[str, str]:
    """(stdout, stderr) of `proc` once it exits, which must say success (`ok`) or failure."""
    out, err = proc.communicate(timeout=300)
    assert (proc.returncode == 0) == ok, f"{' '.join(proc.args[1:])}: exit {proc.returncode}\n{err[-3000:]}"
    return out, err


def _copy(src: epath.Path, dst: epath.Path) -> None:
    """A local file or directory tree copied to `dst` (a gs:// path) object by object."""
    if src.is_dir():
        for path in src.iterdir():
            _copy(path, dst / path.name)
    else:
        dst.write_bytes(src.read_bytes())


def _fresh(path) -> epath.Path:
    """`path` as an epath.Path, with this process's gcsfs listings forgotten (other processes wrote under it)."""
    fsspec.filesystem("gcs", finalize_on_close=True).invalidate_cache()
    return epath.Path(path)


@pytest.mark.slow
def test_tools_on_bucket_paths_equal_local(reference_run, lm_data, gcs, tmp_path):
    """summarize_run, export_pytorch, import_hf, evaluate, generate, eval_memory_loss and write_memory with their
    checkpoint, inputs and outputs in the bucket give what they give on local paths: the same printed summary and
    continuations, the same files (bytes; or values, but for the checkpoint's path, the time and the knowledge
    base's path as given), the same bank objects and the same imported parameters."""
    from m3jax import checkpoint as ckpt_lib
    from m3jax.export.llama import CONFIG_FILE, GENERATION_CONFIG_FILE, WEIGHTS_FILE
    from m3jax.export.memory_config import MEMORY_CONFIG_FILE

    local_run, bucket = Path(reference_run["workdir"]), epath.Path(gcs)
    _copy(epath.Path(local_run / "metrics.jsonl"), bucket / "run" / "metrics.jsonl")
    _copy(epath.Path(local_run / "checkpoints" / "9"), bucket / "run" / "checkpoints" / "9")
    # Orbax marks a local step finished by renaming its directory, a bucket's by this object
    (bucket / "run" / "checkpoints" / "9" / "commit_success.txt").write_text("copied from a finished local step")
    tokenizer = str(Path(lm_data).parent / "spm.model")
    inputs = {"prompts.txt": "The history of\nA function that\n",
              "choices.jsonl": "".join(json.dumps({"context": "The quick brown", "choices": [" fox", " cat"],
                                                   "answer": i}) + "\n" for i in range(2)),
              "kb.jsonl": "".join(json.dumps(doc) + "\n" for doc in KB)}
    io = tmp_path / "io"
    bases = {"local": {"run": str(local_run), "io": str(io)}, "bucket": {"run": f"{gcs}/run", "io": gcs}}
    (io / "in").mkdir(parents=True)
    for base in bases.values():
        for name, text in inputs.items():
            epath.Path(base["io"], "in", name).write_text(text)

    def both(tool, *args):
        """`tool` on local paths and on bucket paths, at once: their stdout by "local" and "bucket"; `args` name
        the paths {run} (the reference run) and {io} (inputs in in/, outputs)."""
        procs = {where: _start(tmp_path / "cwd", tool, *(a.format(**base) for a in args))
                 for where, base in bases.items()}
        return {where: _finish(proc)[0] for where, proc in procs.items()}

    def out(*parts):
        """The local and the bucket output `parts`."""
        return io.joinpath(*parts), _fresh(bucket.joinpath(*parts))

    printed = both("summarize_run", "--workdir={run}")
    assert printed["local"] == printed["bucket"] and "train loss: step 1:" in printed["local"]

    both("export_pytorch", "--checkpoint={run}", "--out={io}/hf", f"--tokenizer={tokenizer}")
    for name in (CONFIG_FILE, GENERATION_CONFIG_FILE, WEIGHTS_FILE, MEMORY_CONFIG_FILE):
        local, ours = out("hf", name)
        assert ours.read_bytes() == local.read_bytes(), name

    # the local export imported again, as a checkpoint in each place (--hf itself is local: the last test)
    both("import_hf", CONFIG, f"--hf={io / 'hf'}", "--out={io}/imported", f"--tokenizer={tokenizer}")
    local, ours = (ckpt_lib.load_model(path) for path in out("imported"))
    assert ours.step_dir.name == local.step_dir.name == "0" and ours.saved_config == local.saved_config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ours.params, local.params)

    both("evaluate", "--checkpoint={run}", "--modes=none", "--choices={io}/in/choices.jsonl", "--heldout_data=",
         "--out={io}/results.json")
    local, ours = (json.loads(path.read_text()) for path in out("results.json"))
    assert ours["settings"].pop("checkpoint") == f"{gcs}/run/checkpoints/9"
    assert local["settings"].pop("checkpoint") == str(local_run / "checkpoints" / "9")
    assert ours == local and local["choices"]["items"] == 2

    printed = both("generate", "--checkpoint={run}", "--mode=none", "--prompts_file={io}/in/prompts.txt",
                   "--max_new_tokens=8")
    assert printed["local"] == printed["bucket"] and "=== prompt 1 (none): A function that" in printed["local"]

    both("eval_memory_loss", CONFIG, "--checkpoint={run}", f"--tokenizer={tokenizer}", "--num_passages=2", "--k=8",
         "--codec=bf16", "--batch_size=2", "--json={io}/memory_loss.json")
    local, ours = (json.loads(path.read_text()) for path in out("memory_loss.json"))
    for result in (local, ours):
        del result["setup"]["checkpoint"], result["setup"]["seconds"]
    assert ours == local

    both("write_memory", CONFIG, "--checkpoint={run}", f"--tokenizer={tokenizer}", "--knowledge={io}/in/kb.jsonl",
         "--bank={io}/bank")
    local, ours = (json.loads(path.read_text()) for path in out("bank", "writer.json"))
    assert (local.pop("knowledge"), ours.pop("knowledge")) == (f"{io}/in/kb.jsonl", f"{gcs}/in/kb.jsonl")
    assert ours == local
    local, ours = (bank_files(path) for path in out("bank"))
    assert "memory/c/0/0/0/0/0/0" in local and ours.keys() == local.keys()
    assert {k: v for k, v in ours.items() if k != "writer.json"} == {k: v for k, v in local.items()
                                                                      if k != "writer.json"}
    assert not (tmp_path / "cwd" / "gs:").exists()


def test_tokenizer_and_entities_to_a_bucket(gcs, tmp_path):
    """train_tokenizer and make_entities write to a bucket the bytes they write to local disk."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Line {i}: the quick brown fox jumps over {i} lazy dogs."}) + "\n"
                              for i in range(40)))
    local = tmp_path / "out"
    for base in (local, gcs):
        _finish(_start(tmp_path / "cwd", "train_tokenizer", f"--corpus={corpus}", f"--out={base}/tokenizer/spm",
                       "--vocab_size=300"))
        _finish(_start(tmp_path / "cwd", "make_entities", f"--out={base}/entities", "--num_entities=8",
                       "--mix_ratio=1"))
    assert not (tmp_path / "cwd" / "gs:").exists()
    bucket = _fresh(gcs)
    for name in ("tokenizer/spm.model", "tokenizer/spm.vocab", "entities/train.jsonl", "entities/knowledge.jsonl",
                 "entities/cloze.jsonl", "entities/entities.json"):
        assert (bucket / name).read_bytes() == (local / name).read_bytes(), name


def test_local_only_inputs_are_refused_naming_the_url(gcs, tmp_path):
    """A Hugging Face directory (safetensors opens its files by local path) and prepared data (ArrayRecord shards)
    given as URLs: the tool exits with the URL, why and what to do, no traceback, and writes nothing."""
    from m3jax.export.llama import HFCheckpointError, load_hf_llama

    hf, data = f"{gcs}/llama", f"{gcs}/data"
    with pytest.raises(HFCheckpointError, match=f"^{hf}: .*local disk"):
        load_hf_llama(hf)
    imported = _start(tmp_path, "import_hf", f"--hf={hf}", f"--out={tmp_path / 'imported'}")
    prepared = _start(tmp_path, "prepare_data", "--corpus=embedded", f"--tokenizer={tmp_path / 'spm.model'}",
                      f"--out={data}")
    _, err = _finish(imported, ok=False)
    assert f"import_hf: {hf}: a Hugging Face directory is read from local disk only" in err
    assert "gcloud storage cp" in err and "Traceback" not in err and not (tmp_path / "imported").exists()
    _, err = _finish(prepared, ok=False)
    assert f"prepare_data: data directory {data}: prepared data" in err and "gcsfuse" in err
    assert "Traceback" not in err and not (tmp_path / "gs:").exists()
