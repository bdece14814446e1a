"""The prepared GPU check (benchmarks/gpu_check.sh). On one GPU, within about 8 minutes, offline,
with only torch, triton, jinja2, sympy, typer, tqdm and scikit-learn installed, it runs:

1. the GPU correctness tests (kernels against the emitted model, CUDA-graph attacks against eager);
2. the table: PGD-10 training step and PGD-20 evaluation, batch 128, channels_last, of
   robustresnet-a1, robustresnet-a4 and wrn-34-10 in bf16 and fp32, ours against the plain fp32
   reference loop in the same run (`trainers.bench`), with multiply-adds per second;
3. regional compile times (cold cache, then warm);
4. a kernel-level CUDA profile of A1's forward and backward (bf16, channels_last).

Writes gpu_check.json and gpu_check.md to --out. `--smoke` runs the same code on tiny models and
the CPU in a minute (tests/test_gpu_check.py), so the script is known to work before device time
is spent on it. Each section records its error instead of stopping the others; a deadline skips
what would not finish.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTIONS = ("tests", "table", "compile", "profile")
MODELS = ("robustresnet-a1", "robustresnet-a4", "wrn-34-10")
SMOKE_MODELS = {
    "robust-tiny": dict(block="robust", depths=(2, 1, 1), planes=(16, 32, 64)),
    "basic-tiny": dict(block="basic", depths=(1, 1, 1), planes=(16, 32, 64)),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="The prepared GPU check (see the module docstring): writes gpu_check.json and gpu_check.md."
    )
    parser.add_argument(
        "out", nargs="?", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"),
        help="Directory for the reports [default: $OUT, else benchmarks/results/ in the repository].",
    )  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="Tiny models on the CPU: check the script itself.")
    parser.add_argument("--budget", type=float, default=450.0, help="Seconds after which sections are skipped.")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"Which to run, of {','.join(SECTIONS)}.")
    args = parser.parse_args(argv)
    chosen = [s for s in args.sections.split(",") if s]
    unknown = [s for s in chosen if s not in SECTIONS] or ([] if chosen else ["(none)"])
    if unknown:
        parser.error(f"--sections: unknown {', '.join(map(repr, unknown))}; take some of {','.join(SECTIONS)}")
    out = Path(args.out)
    check = Check(smoke=args.smoke, deadline=time.time() + args.budget, sections=chosen)
    if check.device != "cuda" and not args.smoke:
        parser.error("no CUDA GPU here: the check measures one (--smoke runs it on tiny models on the CPU)")
    out.mkdir(parents=True, exist_ok=True)
    check.run(lambda: _write(out, check.report))  # after each section: a run cut short keeps what finished
    print(markdown(check.report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", file=sys.stderr)
    return 0


def _write(out: Path, report: dict) -> None:
    for name, text in (
        ("gpu_check.json", json.dumps(report, indent=2, default=str) + "\n"),
        ("gpu_check.md", markdown(report)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


class Check:
    def __init__(self, smoke: bool, deadline: float, sections=SECTIONS) -> None:
        import torch

        self.torch, self.smoke, self.deadline, self.sections = torch, smoke, deadline, sections
        self.device = "cpu" if smoke or not torch.cuda.is_available() else "cuda"
        self.report: dict = {"environment": self.environment(), "sections": {}}

    def environment(self) -> dict:
        torch = self.torch
        env = {"python": platform.python_version(), "torch": torch.__version__, "device": self.device}
        if self.device == "cuda":
            env.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
        return env

    def run(self, after_each=lambda: None) -> None:
        for name in self.sections:
            section = {"tests": self.tests, "table": self.table, "compile": self.compile_times}.get(name, self.profile)
            if time.time() > self.deadline:
                self.report["sections"][name] = {"skipped": "out of time"}
                continue
            t0 = time.time()
            try:
                result = section()
            except Exception as exc:  # noqa: BLE001 - a section's failure is reported, the others still run
                result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            result["seconds"] = round(time.time() - t0, 1)
            self.report["sections"][name] = result
            after_each()
            print(f"gpu_check: {name} done in {result['seconds']} s", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ sections

    def tests(self) -> dict:
        """The GPU-only correctness tests (pytest without conftest: hypothesis is not installed)."""
        selected = ["tests/test_kernels.py", "tests/test_cuda_graphs.py"]
        # on the GPU its own tests; smoke: two CPU ones (the interpreter's, where triton is imported first here)
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "--noconftest",
            *selected,
            "-k",
            "cpu or library" if self.smoke else "gpu",
        ]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
        tail = (done.stdout + done.stderr).strip().splitlines()
        return {"passed": done.returncode == 0, "summary": tail[-1] if tail else "", "output": tail[-40:]}

    def models(self) -> dict:
        import scaler
        from scaler.spec import ArchSpec

        names = {n: ArchSpec(**spec) for n, spec in SMOKE_MODELS.items()} if self.smoke else dict.fromkeys(MODELS)
        out = {}
        for name, spec in names.items():
            spec = spec if spec is not None else scaler.get_spec(name)
            out[name] = (spec, scaler.count(spec).flops)
        return out

    def table(self) -> dict:
        """Ours (bf16 and fp32) against the fp32 reference loop, timed once per model and mode; in
        bf16 also ours without the kernels (robust models) and the evaluation on CUDA graphs. A4
        (8x A1's multiply-adds) gets fewer steps and images, to stay within the budget."""
        import scaler
        from trainers.bench import bench_eval, bench_train

        batch = 8 if self.smoke else 128
        rows = []
        for name, (spec, flops) in self.models().items():
            steps, warmup, n = (1, 1, 16) if self.smoke else (2, 1, 128) if flops > 20e9 else (3, 1, 256)
            blocks = spec.block if isinstance(spec.block, tuple) else (spec.block,)
            fused = True if "robust" in blocks else None  # robust blocks: the kernels; others as measured fastest
            for precision in ("bf16", "fp32"):
                if time.time() > self.deadline:
                    rows.append({"model": name, "precision": precision, "skipped": "out of time"})
                    continue
                first = precision == "bf16"
                common = dict(batch_size=batch, precision=precision, device=self.device, flops_per_image=flops)
                train = dict(method="pgd-at", steps=steps, warmup=warmup, **common)
                evaluation = dict(attack="pgd20", n=n, **common)
                row = {"model": name, "precision": precision, "flops": flops, "eval_n": n, "train_steps": steps}
                row["train"] = _cell(bench_train, scaler.create_model(spec), fused=fused, reference=first, **train)
                row["eval"] = _cell(bench_eval, scaler.create_model(spec), fused=fused, reference=first, **evaluation)
                if first and self.device == "cuda":
                    row["eval_graphs"] = _cell(
                        bench_eval,
                        scaler.create_model(spec),
                        fused=fused,
                        reference=False,
                        cuda_graphs=True,
                        **evaluation,
                    )
                if first and fused:
                    row["train_plain"] = _cell(
                        bench_train, scaler.create_model(spec), fused=False, reference=False, **train
                    )
                rows.append(row)
        _fill_reference(rows)
        return {"rows": rows, "batch_size": batch}

    def compile_times(self) -> dict:
        """Regional compile of A4 (tiny model in smoke mode): a training step's compile, cold cache
        then warm (a fresh process reads the on-disk cache)."""
        name = next(iter(self.models())) if self.smoke else "robustresnet-a4"
        if self.smoke and shutil.which("g++") is None:
            return {"skipped": "no C++ compiler"}
        cache = tempfile.mkdtemp(prefix="scaler-inductor-")
        results = {}
        for run in ("cold", "warm"):
            if time.time() > self.deadline:
                results[run] = {"skipped": "out of time"}
                continue
            code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.gpu_check import compile_once; "
            code += f"compile_once({name!r}, {self.device!r}, {self.smoke!r})"
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            left = max(30.0, self.deadline - time.time())  # the run's budget, not the compiler's
            try:
                done = subprocess.run(
                    [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=left
                )
            except subprocess.TimeoutExpired:
                results[run] = {"error": f"not finished in {left:.0f} s"}
                continue
            lines = done.stdout.strip().splitlines()
            results[run] = json.loads(lines[-1]) if done.returncode == 0 and lines else {"error": done.stderr[-2000:]}
        return {"model": name, **results}

    def profile(self) -> dict:
        """The costliest kernels of A1's forward and backward (bf16 autocast, channels_last, batch
        128, the blocks through the fast runtime), per iteration."""
        import scaler
        from trainers.fused import fused_blocks

        torch = self.torch
        name, (spec, flops) = next(iter(self.models().items()))
        batch, iters = (8, 1) if self.smoke else (128, 3)
        model = scaler.create_model(spec).to(self.device).to(memory_format=torch.channels_last)
        x = torch.rand(batch, 3, 32, 32, device=self.device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), device=self.device)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)

        def step():
            with torch.autocast(self.device, torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()

        with fused_blocks(model, True):
            for _ in range(2):
                step()
            _sync(torch, self.device)
            t0 = time.perf_counter()
            with torch.profiler.profile(activities=activities) as prof:
                for _ in range(iters):
                    step()
                _sync(torch, self.device)
            seconds = (time.perf_counter() - t0) / iters
        return {
            "model": name,
            "batch_size": batch,
            "ms_per_iteration": 1000 * seconds,
            **_kernels(prof, iters, flops * batch * 3 / seconds),
        }


def _cell(bench, model, **kwargs) -> dict:
    """One benchmark's result, or its error (the rest of the table still runs)."""
    try:
        return bench(model, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return {"error": f"{type(exc).__name__}: {exc}"}


def compile_once(name: str, device: str, smoke: bool) -> None:
    """One process's regional compile of a model: the seconds to the end of the first training-mode
    forward and backward and of the first eval-mode input gradient (an attack step); prints JSON."""
    import torch

    import scaler
    from scaler.spec import ArchSpec
    from trainers.compiled import compile_model, compiled_regions

    spec = ArchSpec(**SMOKE_MODELS[name]) if smoke else scaler.get_spec(name)
    model = scaler.create_model(spec).to(device).to(memory_format=torch.channels_last)
    batch = 8 if smoke else 128
    x = torch.rand(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    twin = compile_model(model, regional=True)
    times = {}
    t0 = time.perf_counter()
    with torch.autocast(device, torch.bfloat16):
        twin.train()
        twin(x).float().sum().backward()
        _sync(torch, device)
        times["train_step_seconds"] = time.perf_counter() - t0
        twin.eval()
        xa = x.clone().requires_grad_(True)
        torch.autograd.grad(twin(xa).float().sum(), [xa])
        _sync(torch, device)
    times["attack_step_seconds"] = time.perf_counter() - t0 - times["train_step_seconds"]
    times["compiled_blocks"] = compiled_regions(twin)
    times["total_seconds"] = time.perf_counter() - t0
    print(json.dumps(times))


def _sync(torch, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _kernels(prof, iters: int, macs_per_s: float) -> dict:
    """The top device kernels (CPU ops where no device was profiled) by self time, per iteration."""
    events = prof.key_averages()
    device_events = [e for e in events if _device_time(e) > 0]
    use = device_events or list(events)
    timer = _device_time if device_events else (lambda e: e.self_cpu_time_total)
    total = sum(timer(e) for e in use) or 1.0
    top = sorted(use, key=timer, reverse=True)[:20]
    rows = [
        {
            "name": e.key[:90],
            "calls": e.count / iters,
            "ms": timer(e) / 1000 / iters,
            "share": timer(e) / total,
        }
        for e in top
    ]
    launches = sum(e.count for e in device_events) / iters if device_events else None
    return {"kernels": rows, "launches_per_iteration": launches, "tmacs_per_s": macs_per_s / 1e12}


def _device_time(event) -> float:
    return float(getattr(event, "self_device_time_total", 0.0) or getattr(event, "self_cuda_time_total", 0.0) or 0.0)


def _fill_reference(rows: list[dict]) -> None:
    """Speedups against the reference each model's bf16 row timed (one reference a model and mode):
    for its fp32 row, and for ours without kernels and on CUDA graphs."""
    reference = {}
    for row in rows:
        for part, mode in (("train", "train"), ("eval", "eval"), ("train_plain", "train"), ("eval_graphs", "eval")):
            result = row.get(part)
            if not result or "images_per_s" not in result:
                continue
            if "reference_images_per_s" in result:
                reference[(row["model"], mode)] = result["reference_images_per_s"]
            elif (row["model"], mode) in reference:
                result["reference_images_per_s"] = reference[(row["model"], mode)]
                result["speedup"] = result["images_per_s"] / reference[(row["model"], mode)]


def _not_run(section: dict) -> str:
    return "not run (--sections)" if "not run" in section else str(section)


def _eval_sizes(rows: list[dict]) -> str:
    return ", ".join(f"{r['eval_n']} ({r['model']})" for r in rows if r.get("precision") == "bf16" and "eval_n" in r)


def _graphs(result: dict | None) -> str:
    return "n/a" if result and result.get("cuda_graphs") is False else _rate(result)


def _rate(result: dict | None, key: str = "images_per_s") -> str:
    if not result or key not in result:
        return "-" if not result or "error" not in result else "error"
    return f"{result[key]:.1f}"


def _speedup(result: dict) -> str:
    return f"{result['speedup']:.2f}x" if "speedup" in result else "-"


def _tmacs(result: dict) -> str:
    return f"{result['gflops_per_s'] / 1000:.1f}" if "gflops_per_s" in result else "-"


def markdown(report: dict) -> str:
    """The report as a reader wants it: environment, correctness, the table, compile times, profile."""
    env, sections = report["environment"], report["sections"]
    tests = sections.get("tests", {"not run": True})
    compiled = sections.get("compile", {"not run": True})
    lines = ["# GPU check", "", ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    lines += [
        "## Correctness on the device",
        "",
        f"{tests.get('summary') or tests.get('error') or _not_run(tests)}",
        "",
    ]
    lines += ["## Throughput (images/s; speedup over the plain fp32 reference loop; T multiply-adds/s)", ""]
    lines += _table_lines(sections.get("table", {"not run": True}))
    lines += ["", "## Regional compile", ""]
    lines += [_not_run(compiled), ""] if "not run" in compiled else ["```", json.dumps(compiled, indent=2), "```", ""]
    lines += ["## Kernel profile", "", *_profile_lines(sections.get("profile", {"not run": True}))]
    return "\n".join(lines) + "\n"


def _table_lines(table: dict) -> list[str]:
    if "rows" not in table:
        return [str(table.get("error") or _not_run(table))]
    lines = [
        f"Batch {table['batch_size']}, channels_last; train: PGD-10 adversarial training step; eval: PGD-20 "
        f"evaluation of {_eval_sizes(table['rows'])} images. No kernels: ours with --no-fused (robust models); "
        "CUDA graphs: eval --cuda-graphs (n/a: not on a GPU).",
        "",
        "| model | precision | train ours | train ref | speedup | T MAC/s | no kernels | eval ours | eval ref | speedup | CUDA graphs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table["rows"]:
        if "skipped" in row:
            lines.append(f"| {row['model']} | {row['precision']} | skipped: {row['skipped']} |||||||||")
            continue
        t, e = row["train"], row["eval"]
        cells = [
            _rate(t), _rate(t, "reference_images_per_s"), _speedup(t), _tmacs(t), _rate(row.get("train_plain")),
            _rate(e), _rate(e, "reference_images_per_s"), _speedup(e), _graphs(row.get("eval_graphs")),
        ]  # fmt: skip
        lines.append(f"| {row['model']} | {row['precision']} | " + " | ".join(cells) + " |")
    errors = [
        f"{r['model']} {r['precision']} {k}: {v['error']}" for r in table["rows"] for k, v in r.items() if _failed(v)
    ]
    return lines + (["", *(f"- error: {line}" for line in errors)] if errors else [])


def _failed(cell) -> bool:
    return isinstance(cell, dict) and "error" in cell


def _profile_lines(profile: dict) -> list[str]:
    if "kernels" not in profile:
        return [str(profile.get("error") or _not_run(profile))]
    launches = profile["launches_per_iteration"] or "n/a (no device profiled: CPU ops below)"
    lines = [
        f"{profile['model']}, batch {profile['batch_size']}, forward+backward {profile['ms_per_iteration']:.1f} ms, "
        f"{profile['tmacs_per_s']:.2f} T multiply-adds/s, kernel launches per iteration: {launches}",
        "",
        "| kernel | calls/iter | ms/iter | share |",
        "|---|---|---|---|",
    ]
    return lines + [
        f"| `{k['name']}` | {k['calls']:.0f} | {k['ms']:.2f} | {100 * k['share']:.1f}% |" for k in profile["kernels"]
    ]


if __name__ == "__main__":
    sys.exit(main())
