"""trainers: one model at a time. Data, attacks, losses, the training loop and evaluation.

The API the CLI calls (imported lazily, so `import trainers` stays cheap):
`train(config, out_dir)`, `resume(out_dir)`, `evaluate(run_dir_or_checkpoint, attacks=...)`,
with `trainers.config.make_config(recipe, overrides)` building the config;
`import_checkpoint(file, run_dir, ...)` and `export_run(run_dir, file, to=...)` for other codebases'
checkpoints (trainers.interop).
"""

from __future__ import annotations

__all__ = ["evaluate", "export_run", "import_checkpoint", "make_config", "resume", "train"]


def __getattr__(name: str):
    if name in ("train", "resume"):
        from trainers import run

        return getattr(run, name)
    if name == "evaluate":
        from trainers.run_eval import evaluate_run

        return evaluate_run
    if name in ("import_checkpoint", "export_run"):
        from trainers import interop

        return getattr(interop, name)
    if name == "make_config":
        from trainers.config import make_config

        return make_config
    raise AttributeError(f"module 'trainers' has no attribute {name!r}")
