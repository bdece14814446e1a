"""Studies: sweeps, results, benchmarks, search and analyses over many architectures (above trainers)."""
