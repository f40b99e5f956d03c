"""The commands of README.md and docs/*.md are the ones the code takes: every script a command runs exists, every flag
it gives is defined by that script (or, for `--config.KEY`, is a key of the config the command names), every make
target exists, and every tool of tools/ that a command runs is run by a test or by `make demo` (tools/demo.sh).
Benchmarks (tools/bench/) are measurements run by hand: their commands are checked for flags only."""

import importlib
import re
from pathlib import Path

import pytest
from conftest import REPO

ROOT = Path(REPO)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ABSL = {"help", "helpfull", "helpshort", "helpxml", "verbosity", "v", "logtostderr", "alsologtostderr", "log_dir",
        "flagfile", "undefok", "only_check_args", "stderrthreshold", "showprefixforinfo"}
# `python tools/x.py`, `python -m m3jax.train`, a launcher (its flags are the trainer's), with what follows on the line
COMMAND = re.compile(r"(?:python3?|\.venv/bin/python)\s+(tools/[\w/]+\.py|-m\s+m3jax\.train)\b([^`#\n]*)"
                     r"|(?:bash\s+)?\b(launch/\w+\.sh)\b([^`#\n]*)|\bmake\s+([a-z][\w-]*)")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z_][\w.]*)")


def commands() -> list[tuple[str, str, str]]:
    """(document, script or make target, the rest of its command line) of every command in code of the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        code = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S) + re.findall(r"`([^`\n]+)`", text)
        for block in code:
            for line in block.replace("\\\n", " ").splitlines():
                for m in COMMAND.finditer(line):
                    if m.group(5):
                        found.append((doc.name, "make", m.group(5)))
                    elif m.group(1):
                        script = "m3jax/train/__main__.py" if m.group(1).startswith("-m") else m.group(1)
                        found.append((doc.name, script, m.group(2)))
                    else:
                        found.append((doc.name, m.group(3), m.group(4)))
    return found


def defined_flags(script: str) -> tuple[set[str], set[str], bool]:
    """(flags the script defines, those of them that are booleans, whether it takes a config file)."""
    source = (ROOT / script).read_text()
    names = set(re.findall(r"DEFINE_\w+\(\s*\"(\w+)\"", source))
    bools = set(re.findall(r"DEFINE_bool\(\s*\"(\w+)\"", source))
    return names, bools, "DEFINE_config_file(" in source


def config_has(config_path: str, key: str) -> bool:
    module = importlib.import_module(config_path.removesuffix(".py").replace("/", "."))
    node = module.get_config()
    for part in key.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


ALL = commands()


def test_the_docs_hold_commands():
    assert len(ALL) > 30, ALL  # the extraction works: README and docs are full of commands
    assert {"make"} < {script for _, script, _ in ALL}


@pytest.mark.parametrize("doc,script,rest", ALL, ids=[f"{d}:{s}" for d, s, _ in ALL])
def test_a_documented_command_matches_the_code(doc, script, rest):
    if script == "make":
        targets = re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), flags=re.M)
        assert rest in targets, f"{doc}: `make {rest}`: no such target in the Makefile"
        return
    assert (ROOT / script).exists(), f"{doc}: {script} does not exist"
    if script.startswith("launch/"):
        script = "m3jax/train/__main__.py"  # a launcher passes its flags to the trainer
    names, bools, takes_config = defined_flags(script)
    config = re.search(r"--config=(configs/\w+\.py)", rest)
    for flag in FLAG.findall(rest):
        if flag.startswith("config."):
            assert takes_config, f"{doc}: {script} takes no --config, got --{flag}"
            key = flag.removeprefix("config.")
            assert config_has(config.group(1) if config else "configs/base.py", key), \
                f"{doc}: {script} --{flag}: no key {key!r} in {config.group(1) if config else 'the base config'}"
            continue
        ok = flag in names or flag in ABSL or (flag.startswith("no") and flag[2:] in bools)
        assert ok, f"{doc}: {script} has no flag --{flag}"


def test_every_documented_tool_is_run_by_a_test_or_the_demo():
    runners = [p.read_text() for p in (ROOT / "tests").glob("test_*.py")] + [(ROOT / "tools/demo.sh").read_text()]
    runners += [(ROOT / "tests/conftest.py").read_text()]
    tools = {script for _, script, _ in ALL if script.startswith("tools/") and not script.startswith("tools/bench/")}
    missing = [t for t in sorted(tools) if not any(t in text or f'"{Path(t).stem}"' in text for text in runners)]
    assert not missing, f"documented tools no test or demo stage runs: {missing}"
