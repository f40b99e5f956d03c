"""Every tool refuses a bad numeric flag when it parses its flags, naming the flag, before any work starts."""

import subprocess
import sys

from conftest import REPO

CONFIG = "--config=tests/lm_test_config.py"
# (tool, the required flags with placeholder values, the bad flag, the text absl's refusal holds)
CASES = [
    ("train_tokenizer", ["--out=/nonexistent/spm"], "--vocab_size=-5", "is not integer >= 261"),
    ("prepare_data", ["--tokenizer=x.model", "--out=/nonexistent"], "--heldout_fraction=1.5", "must be in [0, 1)"),
    ("prepare_data", ["--tokenizer=x.model", "--out=/nonexistent"], "--seq_len=0", "is not a positive integer"),
    ("export_pytorch", ["--checkpoint=x", "--out=/nonexistent"], "--pad_id=-1", "is not a non-negative integer"),
    ("memory_budget", [CONFIG, "--num_refs=10"], "--memories_per_chunk=0", "must be > 0"),
    ("eval_memory_loss", [CONFIG, "--checkpoint=x", "--tokenizer=x.model"], "--k=8,0", "positive integers"),
    ("write_memory", [CONFIG, "--checkpoint=x", "--tokenizer=x", "--knowledge=x", "--bank=x"], "--batch_size=0",
     "is not a positive integer"),
    ("build_index", [CONFIG, "--bank=x", "--tokenizer=x"], "--block_refs=0", "is not a positive integer"),
    ("retrieve", [CONFIG, "--data=x", "--bank=x"], "--log_every_s=-1", "is not a non-negative number"),
]


def test_bad_numeric_flags_are_refused_by_name():
    procs = [subprocess.Popen([sys.executable, f"tools/{tool}.py", *required, bad], cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for tool, required, bad, _ in CASES]  # in parallel: each costs only its imports
    for (tool, _, bad, says), proc in zip(CASES, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0, f"{tool} {bad} was accepted: {out}{err}"
        flag = bad.split("=")[0]
        assert f"Flags parsing error: flag {flag}=" in err and says in err, f"{tool} {bad}: {err}"
