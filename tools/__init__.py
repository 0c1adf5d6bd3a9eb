"""Developer tools: stub generation, benchmarks."""
