"""The training-memory benchmark runs one tiny iteration per configuration, so it never rots (issue 8)."""

import importlib.util
import json
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("train_memory", ROOT / "benchmarks" / "train_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_memory_tiny_has_every_row_and_shared_base_below_naive(tmp_path, capsys):
    """Every configuration runs one iteration in its own forked process; the shared-base layout's peak and tensor
    bytes are below the naive layout's, with and without checkpointing.

    Cost: seven configurations x ~1-2 s (update_ratio 1, the tiny SDXL UNet at 8x8 latents): ~15 s here, above the
    suite's 10 s guideline because the issue asks for every row of the table to run in `make test`."""
    benchmark = load_benchmark()
    output = tmp_path / "results.json"
    results = benchmark.main(["--tiny", "--update_ratio", "1", "--output", str(output)])
    table = capsys.readouterr().out
    for row in benchmark.ROWS:
        assert f"| {row.name} |" in table
    for shared, naive in benchmark.COMPARISONS:
        assert f"| ratio {shared} / {naive} |" in table
    by_name = {result["name"]: result for result in results}
    assert set(by_name) == {row.name for row in benchmark.ROWS}
    for shared, naive in benchmark.COMPARISONS:
        assert by_name[shared]["peak_bytes"] < by_name[naive]["peak_bytes"]
        assert by_name[shared]["tensor_bytes"] < by_name[naive]["tensor_bytes"]
        # Same trainable adapters in both layouts: only the frozen copies differ.
        assert by_name[shared]["trainable_parameters"] == by_name[naive]["trainable_parameters"]
    assert all(result["peak_bytes"] > 0 and result["seconds"] > 0 for result in results)
    assert json.loads(output.read_text())["results"] == results
