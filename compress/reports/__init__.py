"""Reports in Markdown and self-contained HTML: analysis, recipe runs, benchmarks, CIFAR-K."""
