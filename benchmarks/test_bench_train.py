"""Adversarial training step: ours (bf16 autocast where supported, channels_last, frozen params,
folded eval BN in the attack, fused SGD, no host syncs) vs a plain fp32 NCHW reference loop on
the same emitted model, in the same process; "ours-unfolded" is ours with BN folding off, to
measure folding's own share. Measured on the 2-core AVX-512-BF16 CPU: 2.66x over the reference,
folding alone 1.00x (it costs nothing and gains nothing there). Run: python -m pytest benchmarks -q -k train"""

import pytest

from scaler.builder import build_model
from scaler.spec import ArchSpec

SMALL_WRN = ArchSpec("basic", (1, 1, 1), (64, 128, 256))  # depths 1,1,1, widening 4,4,4


@pytest.fixture(scope="module")
def results():
    return {}


@pytest.mark.parametrize("variant", ["reference", "ours-unfolded", "ours"])
def test_pgd_at_step(benchmark, results, variant):
    import torch

    from trainers.bench import reference_step
    from trainers.config import make_config
    from trainers.step import Stepper, make_optimizer, resolve_precision

    torch.manual_seed(0)
    x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))
    cfg = make_config("bat", {"model": "bench", "batch_size": 64})
    net = build_model(SMALL_WRN)
    if variant == "reference":
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4, foreach=False)
        benchmark.pedantic(reference_step, args=(net, opt, x, y, cfg), rounds=4, iterations=1, warmup_rounds=1)
    else:
        net = net.to(memory_format=torch.channels_last)
        stepper = Stepper(
            net,
            make_optimizer(net, cfg),
            cfg,
            device=torch.device("cpu"),
            autocast_dtype=resolve_precision("auto", torch.device("cpu")),
            attack_generator=torch.Generator().manual_seed(0),
            war=None,
        )
        stepper.fold_bn = variant == "ours"  # "ours-unfolded": the same step with BN folding off
        benchmark.pedantic(stepper.step, args=(x, y), rounds=4, iterations=1, warmup_rounds=1)
    results[variant] = benchmark.stats.stats.median
    benchmark.extra_info["images_per_s"] = 64 / benchmark.stats.stats.median
    if len(results) == 3:
        ratio = results["reference"] / results["ours"]
        folding = results["ours-unfolded"] / results["ours"]
        benchmark.extra_info["speedup_vs_reference"] = ratio
        benchmark.extra_info["speedup_from_bn_folding"] = folding
        print(f"\nspeedup over the fp32 NCHW reference loop: {ratio:.2f}x; BN folding alone: {folding:.2f}x")
        assert ratio >= 2.5  # folding is reported, not asserted: 1.00x on this CPU (bf16, batch 64)
