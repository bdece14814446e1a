"""`scaler plot`: every kind writes a valid image (checked by its magic bytes and by decoding PNGs)."""

from __future__ import annotations

import json

import pytest

from scaler_cli.app import main
from studies.synthetic import generate, write

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "svg": b"<?xml", "pdf": b"%PDF"}


@pytest.fixture(scope="module")
def bench_file(tmp_path_factory):
    """The 400 cheapest architectures of the synthetic NARes benchmark, 12-epoch histories."""
    return write(tmp_path_factory.mktemp("plots") / "synth.jsonl", generate(seed=1, epochs=12, limit=400))


def _valid(path, fmt):
    data = path.read_bytes()
    assert data.startswith(MAGIC[fmt]), f"{path} is not a {fmt}"
    if fmt == "png":
        import matplotlib.image

        img = matplotlib.image.imread(path)
        assert img.shape[0] > 300 and img.shape[1] > 500  # a full figure, not an empty canvas
        assert img[..., :3].std() > 0.05  # something is drawn


@pytest.mark.parametrize("kind", ["pareto", "curves", "rd", "stages"])
@pytest.mark.parametrize("fmt", ["png", "svg", "pdf"])
def test_each_plot_writes_a_valid_image(capsys, tmp_path, bench_file, kind, fmt):
    out = tmp_path / f"{kind}.{fmt}"
    extra = ["--budgets", "4G,5G"] if kind == "pareto" else []
    assert main(["plot", kind, str(bench_file), "-o", str(out), *extra]) == 0, capsys.readouterr().err
    _valid(out, fmt)


def test_pareto_svg_names_the_front_and_the_rules(tmp_path, bench_file):
    out = tmp_path / "p.svg"
    assert main(["plot", "pareto", str(bench_file), "-o", str(out), "--budgets", "4G,5G"]) == 0
    svg = out.read_text()
    for text in ("Pareto front", "robustscaling", "uniform", "FLOPs (G", "parameters (M)", "AutoAttack"):
        assert text in svg


def test_curves_of_chosen_archs(tmp_path, bench_file):
    arch = json.loads(bench_file.read_text().splitlines()[5])["arch"]
    spec = ",".join(f"{k}={v}" for k, v in arch.items())
    out = tmp_path / "c.svg"
    assert main(["plot", "curves", str(bench_file), "-o", str(out), "--arch", spec]) == 0
    assert "chosen: d" in out.read_text()


def test_lipschitz_from_an_eval_json(tmp_path):
    ev = tmp_path / "eval.json"
    lips = {f"stage{s}.{b}": 1.0 + s + 0.1 * b for s in (1, 2, 3) for b in range(4)}
    ev.write_text(json.dumps({"clean": {"accuracy": 90}, "pgd20": {"accuracy": 40, "per_block_lip": lips}}))
    out = tmp_path / "lip.png"
    assert main(["plot", "lipschitz", str(ev), "-o", str(out)]) == 0
    _valid(out, "png")


@pytest.mark.parametrize(
    "args, message",
    [
        (["plot", "histogram", "x.jsonl", "-o", "a.png"], "unknown plot"),
        (["plot", "pareto", "x.jsonl"], "give the image file"),
        (["plot", "pareto", "x.jsonl", "-o", "a.jpg"], "must end in .png, .svg or .pdf"),
        (["plot", "pareto", "missing.jsonl", "-o", "a.png"], "not found"),
        (["plot", "curves", "B", "-o", "a.png", "--arch", "D1:4"], "write it as D1=4"),
        (["plot", "curves", "B", "-o", "a.png", "--arch", "D1=4"], "lacks W1, D2, W2, D3, W3: give D1, W1"),
        (["plot", "curves", "B", "-o", "a.png", "--arch", "D1=4,W1=8,D2=4,W2=8,D3=4,W3=8,X=2"], "has no X here"),
    ],
)
def test_bad_input_is_one_line(capsys, tmp_path, bench_file, args, message):
    args = [str(bench_file) if a == "B" else a for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_never_overwrites_without_force(capsys, tmp_path, bench_file):
    out = tmp_path / "rd.png"
    out.write_bytes(b"keep")
    assert main(["plot", "rd", str(bench_file), "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"keep"
    assert main(["plot", "rd", str(bench_file), "-o", str(out), "--force"]) == 0
    _valid(out, "png")


def test_lipschitz_without_per_block_values_is_refused(capsys, tmp_path):
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"pgd20": {"accuracy": 40}}))
    assert main(["plot", "lipschitz", str(ev), "-o", str(tmp_path / "l.png")]) == 2
    assert "--per-block-lipschitz" in capsys.readouterr().err


@pytest.mark.slow
def test_curves_and_lipschitz_of_a_trained_digits_run(tmp_path):
    run = tmp_path / "run"
    args = ["train", "--block", "basic", "--depths", "1,1,1", "--widths", "2,2,2", "--dataset", "digits"]
    args += ["--epochs", "2", "--attack-steps", "1", "--val-n", "32", "--quiet", "--out", str(run)]
    assert main(args) == 0
    for kind in ("curves", "lipschitz"):
        out = tmp_path / f"{kind}.png"
        assert main(["plot", kind, str(run), "-o", str(out), "--n", "32"]) == 0
        _valid(out, "png")


def test_synthetic_accuracies_stay_percentages():
    """Its histories start near 0 at epoch 0, where noise alone went below it (curves drew val_acc < 0)."""
    records = generate(seed=0, epochs=100, limit=300)
    train = [r["train"][0] for r in records]
    for key in ("val_acc", "train_acc", "pgd", "pgd_stable", "cw", "cw_stable"):
        values = [v for t in train for v in t[key]]
        assert 0 <= min(values) and max(values) <= 100, key
    assert min(t["val_acc"][0] for t in train) < 5  # the start near chance that made it go below 0
    tests = [v for r in records for k, v in r["test_best"][0].items() if k.endswith(("_acc", "_stable"))]
    assert 0 <= min(tests) and max(tests) <= 100
