"""benchmarks/mixed_load.py on CPU with the tiny preset: every request gets its tokens, each long
prompt is prefilled in ceil(prompt / chunk) chunks (one when the chunk holds it), the running
decoders get tokens between those chunks, and the reported figures are the ones the raw token
times give."""

import math

import numpy as np
import pytest

from test_bench import load_benchmark

PROMPT, LONG_TOKENS, DECODERS, ARRIVALS = 96, 4, 2, 2
ARGS = ["--model", "tiny", "--context", "256", "--decoders", str(DECODERS), "--decoder-prompt", "16",
        "--solo-tokens", "4", "--prompt", str(PROMPT), "--arrivals", str(ARRIVALS), "--long-tokens", str(LONG_TOKENS),
        "--decode-batch-sizes", "4", "--compilation-cache", "off"]


def test_mixed_load_times_the_decoders_around_each_chunk(capsys):
    results = load_benchmark("mixed_load").main(ARGS + ["--chunk-sizes", "32,128", "--gap-ms", "30,0"])
    out = capsys.readouterr().out
    assert [(r["chunk"], r["gap_ms"]) for r in results] == [(32, 30), (32, 0), (128, 30), (128, 0)]
    for r in results:
        chunk, longs, decoders, t0, t_end = r["chunk"], r["longs"], r["decoders"], r["t0"], r["t_end"]
        # every long prompt got its tokens; the decoders ran until cancelled after the last of them
        assert [len(tl.times) for tl in longs] == [LONG_TOKENS] * ARRIVALS
        assert all(tl.finish_reason == "length" for tl in longs)
        assert all(d.finish_reason == "abort" for d in decoders)
        spacing = longs[1].submitted - longs[0].submitted
        assert spacing >= 0.030 if r["gap_ms"] else spacing < 0.030
        # each long prompt in consecutive chunks of `chunk` tokens: 3 at 32, one at 128 (> the prompt)
        for c in r["chunks"]:
            assert c == [(s, min(chunk, PROMPT - s)) for s in range(0, PROMPT, chunk)]
            assert len(c) == math.ceil(PROMPT / chunk)
        # between a long prompt's arrival and its first token, a decode step follows each chunk
        # (the second prompt waits for the first's chunks too): the decoders' times are honest per token
        for tl, c in zip(longs, r["chunks"]):
            for d in decoders:
                assert sum(tl.submitted < t < tl.times[0] for t in d.times) >= len(c) - 1
        # the figures are what the raw times give
        assert t_end == max(tl.times[-1] for tl in longs) and t0 < min(tl.submitted for tl in longs)
        gaps = [b - a for d in decoders for a, b in zip(d.times, d.times[1:]) if t0 < b <= t_end]
        assert all(sum(t0 < t <= t_end for t in d.times) >= 2 for d in decoders)   # decoding throughout
        assert r["itl_gaps"] == len(gaps)
        assert r["itl_median_ms"] == pytest.approx(1e3 * np.median(gaps))
        assert r["itl_p99_ms"] == pytest.approx(1e3 * np.percentile(gaps, 99))
        assert r["itl_max_ms"] == pytest.approx(1e3 * max(gaps))
        assert 0 < r["itl_median_ms"] <= r["itl_p99_ms"] <= r["itl_max_ms"]
        ttft = sorted(tl.times[0] - tl.submitted for tl in longs)
        assert ttft[0] > 0 and r["ttft_median_ms"] == pytest.approx(1e3 * np.median(ttft))
        tokens = ARRIVALS * (PROMPT + LONG_TOKENS) + sum(t0 < t <= t_end for d in decoders for t in d.times)
        assert r["tokens"] == tokens and r["tok_s"] == pytest.approx(tokens / (t_end - t0))
        assert r["alone_median_ms"] > 0
    # one table per gap, a row per chunk size: the figures, then each over chunk 32's (1 on its own row)
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["32"], ["128"])]
    assert [row[0] for row in rows] == ["32", "128", "32", "128"]
    assert rows[0][8:] == ["1.00x"] * 5
    by = {(r["chunk"], r["gap_ms"]): r for r in results}
    assert float(rows[3][5]) == pytest.approx(by[128, 0]["ttft_median_ms"], abs=0.05)
    assert rows[3][-1] == f"{by[128, 0]['tok_s'] / by[32, 0]['tok_s']:.2f}x"
    assert "commit " in out and "mixed_load.py --model tiny" in out


def test_mixed_load_rejects_a_prompt_over_the_context(capsys):
    with pytest.raises(SystemExit):
        load_benchmark("mixed_load").main(ARGS + ["--prompt", "256"])
    assert "must fit --context 256" in capsys.readouterr().err
