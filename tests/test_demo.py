import pytest

pytest.importorskip("sklearn")


def test_demo_quantizes_real_images_better_with_more_codes():
    from fastvq.demo import main

    psnr, baseline = main(["--codes", "2048", "--lloyd", "1"])
    # More codes reconstruct the held-out photograph better, and both beat flat patches.
    assert psnr[2048] > psnr[256] > baseline > 10, (psnr, baseline)


def test_bench_writes_its_record(tmp_path):
    import json

    from bench.bench_nearest_code import main

    record = json.load(open(main(["--quick", "--reps", "1", "--out", str(tmp_path)])))
    assert {"device", "torch", "git", "backends"} <= set(record["environment"])
    names = {row["name"] for row in record["rows"]}
    assert {"fastvq exact", "torch naive fp32", "torch chunked fp32"} <= names
    for row in record["rows"]:
        assert row["status"] == "ok" and row["ms"] > 0 and row["agree"] == 1.0, row
