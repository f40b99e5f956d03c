"""tools/plot_run.py: runs' train and held-out curves from their metrics.jsonl into one PNG; bad input named."""

import json
import subprocess
import sys

import numpy as np
from conftest import REPO


def plot_cli(*args):
    return subprocess.run([sys.executable, "tools/plot_run.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def write_metrics(workdir, records):
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plots_a_real_run_beside_a_control_with_held_out_metrics(reference_run, tmp_path):
    """The suite's reference training run (9 logged steps) beside a control run with held-out records of two
    metrics (a replayed step counted once): the PNG is written, and every curve has its points."""
    control = tmp_path / "control"
    write_metrics(control, [{"step": 0, "split": "start", "resumed": 0}]
                  + [{"step": s, "split": "train", "loss": 6.0 - 0.1 * s} for s in range(1, 7)]
                  + [{"step": 3, "split": "train", "loss": 5.5}]  # replayed after a resume: the later one wins
                  + [{"step": s, "split": "eval", "loss": 6.2 - 0.1 * s, "loss_memory_off": 6.3}
                     for s in (0, 3, 6)])
    out_png = tmp_path / "plots" / "stage.png"
    done = plot_cli(f"--run=reference={reference_run['workdir']}", f"--run=control={control}", f"--out={out_png}",
                    "--eval_keys=loss,loss_memory_off", "--title=test")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "reference: train 9 points", done.stdout  # no held-out records in the reference run
    assert lines[1] == "control: train 6 points, eval/loss 3 points, eval/loss_memory_off 3 points", done.stdout
    data = out_png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(str(out_png))
    assert image.shape[:2] == (440, 1210) and np.std(image[..., :3]) > 0.05  # 11 x 4 in at 110 dpi, not blank


def test_bad_runs_are_named(tmp_path):
    broken = tmp_path / "broken"
    write_metrics(broken, [{"step": 1, "split": "train", "loss": 1.0}])
    with (broken / "metrics.jsonl").open("a") as f:
        f.write("not json\n")
    done = plot_cli(f"--run=a={broken}", f"--out={tmp_path / 'x.png'}")
    assert done.returncode != 0 and f"{broken}/metrics.jsonl line 2 is not a metrics record" in done.stderr
    done = plot_cli(f"--run=a={tmp_path / 'missing'}", f"--out={tmp_path / 'x.png'}")
    assert done.returncode != 0 and f"{tmp_path / 'missing'}/metrics.jsonl does not exist" in done.stderr
    done = plot_cli(f"--run={broken}", f"--out={tmp_path / 'x.png'}")
    assert done.returncode != 0 and "expected LABEL=WORKDIR" in done.stderr
    assert not (tmp_path / "x.png").exists()
