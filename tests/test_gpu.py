"""GPU paths: CPU-side checks run everywhere; the CUDA ones skip cleanly on machines without a GPU."""

import copy
import re

import pytest
import torch
from conftest import RunIf

from harness.codecs import make_codec
from harness.errors import HarnessError
from harness.generation import greedy_generate
from harness.models import tiny_llama
from harness.runtime import compress_model


@RunIf(no_cuda=True)
def test_gpu_codec_without_cuda_is_a_clean_error():
    with pytest.raises(HarnessError, match="nvcomp_ans decodes on the GPU"):
        make_codec("nvcomp_ans")


def test_gpu_placement_needs_a_gpu_codec():
    model = tiny_llama(seed=0).model
    with pytest.raises(HarnessError, match="placement=gpu needs a GPU codec"):
        compress_model(model, make_codec("zstd"), placement="gpu", layers=1, progress=False)
    with pytest.raises(HarnessError, match="compress.placement='disk' is invalid"):
        compress_model(model, make_codec("zstd"), placement="disk", layers=1, progress=False)


@pytest.mark.gpu
@RunIf(min_gpus=1)
@pytest.mark.parametrize("codec", ["nvcomp_ans", "nvcomp_ans_batched"])
@pytest.mark.parametrize("placement,policy,options", [
    ("gpu", "none", {}), ("gpu", "block", {}), ("gpu", "block", {"ahead": 1}), ("cpu", "prefetch", {"depth": 2}),
    ("cpu", "block", {"ahead": 1}),
])
def test_nvcomp_is_bit_exact_on_cuda(codec, placement, policy, options):
    loaded = tiny_llama(seed=0, device="cuda")
    prompts = ["The capital of France is", "Lossless"]
    ref = greedy_generate(loaded.model, loaded.tokenizer, prompts, 5, 5)
    model = copy.deepcopy(loaded.model)
    runtime = compress_model(model, make_codec(codec), policy=policy, policy_options=options,
                             placement=placement, layers="all", progress=False)
    out = greedy_generate(model, loaded.tokenizer, prompts, 5, 5)
    runtime.end_generation()
    assert torch.equal(out.logits, ref.logits) and out.new_token_ids == ref.new_token_ids
    assert all(layer.ct.payload.is_cuda == (placement == "gpu") for layer in runtime.layers)
    runtime.close()


# -- dfloat11: decoded by DF11's own CUDA kernel (its decode.ptx, launched through cupy) ------------------------------
dfloat11_cuda = RunIf(min_gpus=1, packages=["cupy", "dfloat11"])


def _df11_case(case: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return {
        "normal": lambda: (torch.randn(3_000_001, generator=g) * 0.02).bfloat16(),
        "wide": lambda: (torch.randn(100_000, generator=g) * 30).bfloat16(),  # long codes, chained LUTs
        # 95% one value (1-bit codes): ~31k elements per kernel block, 64 KB of shared memory (past the 48 KB default)
        "skewed": lambda: torch.where(torch.rand(100_000, generator=g) < 0.05, 1.0, 0.5).bfloat16(),
        "tiny": lambda: torch.tensor([0.25], dtype=torch.bfloat16),
    }[case]().reshape(-1, 1)


@pytest.mark.gpu
@dfloat11_cuda
@pytest.mark.parametrize("case", ["normal", "wide", "skewed", "tiny"])
@pytest.mark.parametrize("placement", ["cpu", "gpu"])
def test_dfloat11_kernel_is_bit_exact(case, placement):
    t = _df11_case(case)
    codec = make_codec("dfloat11")
    if case == "skewed":
        assert codec.encode(t).meta["shared_mem"] > 48 * 1024  # the case must exercise the opt-in
    assert codec.decode_device == "cuda"
    ct = codec.encode(t)
    on_gpu = codec.encode(t.cuda())  # the vectorised encoder on the GPU gives the same bytes
    assert torch.equal(on_gpu.payload.cpu(), ct.payload) and on_gpu.meta == ct.meta
    assert torch.equal(codec.decode_cpu(ct).view(torch.int16), t.view(torch.int16))  # the reference agrees
    if placement == "gpu":
        ct.payload = ct.payload.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the kernel runs on torch's current stream, not cupy's default one
        out = torch.full(t.shape, 7.0, dtype=torch.bfloat16, device="cuda")
        got = codec.decode(ct, out=out)
        again = codec.decode(ct)
    side.synchronize()
    assert got is out
    assert torch.equal(out.cpu().view(torch.int16), t.view(torch.int16))
    assert torch.equal(again.cpu().view(torch.int16), t.view(torch.int16))


@pytest.mark.gpu
@dfloat11_cuda
@pytest.mark.parametrize("placement,policy", [("gpu", "none"), ("gpu", "block"), ("cpu", "block")])
def test_dfloat11_generation_is_bit_exact_on_cuda(placement, policy):
    loaded = tiny_llama(seed=0, device="cuda")
    prompts = ["The capital of France is", "Lossless"]
    ref = greedy_generate(loaded.model, loaded.tokenizer, prompts, 5, 5)
    model = copy.deepcopy(loaded.model)
    runtime = compress_model(model, make_codec("dfloat11"), policy=policy, placement=placement, layers="all", progress=False)
    out = greedy_generate(model, loaded.tokenizer, prompts, 5, 5)
    runtime.end_generation()
    assert torch.equal(out.logits, ref.logits) and out.new_token_ids == ref.new_token_ids
    runtime.close()


# -- nvcomp_ans_batched: the chunk layout is plain Python, checked without a GPU ------------------------------------
from harness.codecs.base import CompressedTensor  # noqa: E402
from harness.codecs.nvcomp_layout import (  # noqa: E402
    ALIGN,
    chunk_sizes,
    chunk_tables,
    header_words,
    layout_of,
    pack,
    parse_header,
)


def test_chunk_sizes():
    assert chunk_sizes(0, 4) == []
    assert chunk_sizes(8, 4) == [4, 4]
    assert chunk_sizes(10, 4) == [4, 4, 2]
    assert chunk_sizes(3, 4) == [3]


def _fake_payload(nbytes, chunk_bytes, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [int(s) for s in torch.randint(1, 100, (len(chunk_sizes(nbytes, chunk_bytes)),), generator=g)]
    chunks = [torch.randint(0, 256, (s,), dtype=torch.uint8, generator=g) for s in sizes]
    return pack(header_words(nbytes, chunk_bytes, sizes), chunks), chunks


@pytest.mark.parametrize("nbytes,chunk_bytes", [(1, 2), (4096, 1024), (5000, 1024), (3 * 65536 + 2, 65536)])
def test_payload_layout_round_trip(nbytes, chunk_bytes):
    payload, chunks = _fake_payload(nbytes, chunk_bytes)
    layout = parse_header(payload)
    assert (layout.nbytes, layout.chunk_bytes, layout.num_chunks) == (nbytes, chunk_bytes, len(chunks))
    assert layout.data_start % ALIGN == 0 and all(o % ALIGN == 0 for o in layout.offsets)
    for chunk, offset, size in zip(chunks, layout.offsets, layout.sizes, strict=False):
        assert size == chunk.numel()
        assert torch.equal(payload[layout.data_start + offset : layout.data_start + offset + size], chunk)
    assert layout.data_start + layout.offsets[-1] == payload.numel()


def test_chunk_tables_cover_every_output_byte_once():
    cts = []
    for k, (n, c) in enumerate([(5000, 1024), (2048, 1024), (10, 1024)]):
        payload, _ = _fake_payload(n, c, seed=k)
        cts.append(CompressedTensor("nvcomp_ans_batched", (n // 2,), "bfloat16", n, "", payload, {"data_type": 10}))
    t = chunk_tables(cts)
    assert t["which"] == [0] * 5 + [1] * 2 + [2]
    for k, ct in enumerate(cts):
        mine = [(r, s) for w, r, s in zip(t["which"], t["rel_out"], t["out_bytes"], strict=True) if w == k]
        covered = sorted(mine)
        assert covered[0][0] == 0 and all(a + s == b for (a, s), (b, _) in zip(covered, covered[1:], strict=False))
        assert covered[-1][0] + covered[-1][1] == ct.original_nbytes
        layout = layout_of(ct)
        comp = [(r, s) for w, r, s in zip(t["which"], t["rel_comp"], t["comp_bytes"], strict=True) if w == k]
        assert all(r + s <= ct.payload.numel() and r >= layout.data_start for r, s in comp)


@pytest.mark.parametrize("damage", ["magic", "truncated", "size", "count", "length"])
def test_damaged_payload_headers_are_rejected(damage):
    payload, _ = _fake_payload(5000, 1024)
    words = payload[: 8 * 16].clone().view(torch.int64)
    if damage == "magic":
        words[0] += 1
    elif damage == "count":
        words[3] += 1
    elif damage == "size":
        words[4 + 6 + 2] = 10**6  # chunk 2's size runs past chunk 3's start
    payload[: 8 * 16] = words.view(torch.uint8)
    if damage == "truncated":
        payload = payload[:30]
    elif damage == "length":
        payload = torch.cat([payload, torch.zeros(16, dtype=torch.uint8)])
    with pytest.raises(ValueError):
        parse_header(payload)
    ct = CompressedTensor("nvcomp_ans_batched", (2500,), "bfloat16", 5000, "", payload, {"data_type": 10})
    with pytest.raises(ValueError):
        layout_of(ct)


@RunIf(no_cuda=True)
def test_batched_codec_without_cuda_is_a_clean_error():
    with pytest.raises(HarnessError, match="nvcomp_ans_batched decodes on the GPU"):
        make_codec("nvcomp_ans_batched")


@pytest.mark.gpu
@RunIf(min_gpus=1)
def test_batched_decode_stays_exact_when_buffers_grow():
    """A keyed repeat call reuses its prepared arguments; a larger call in between grows the temp buffer,
    which must invalidate them (a stale temp pointer would be a use-after-free)."""
    codec = make_codec("nvcomp_ans_batched", chunk_bytes=1 << 12)
    g = torch.Generator(device="cuda").manual_seed(0)
    small = [(torch.randn(n, 64, device="cuda", generator=g) * 0.02).to(torch.bfloat16) for n in (8, 100)]
    large = [(torch.randn(n, 64, device="cuda", generator=g) * 0.02).to(torch.bfloat16) for n in (3000, 5000)]
    cs, cl = [codec.encode(t) for t in small], [codec.encode(t) for t in large]
    outs_s, outs_l = [torch.empty_like(t) for t in small], [torch.empty_like(t) for t in large]
    for _ in range(2):
        codec.decode_many(cs, outs_s, key="small")
        codec.decode_many(cl, outs_l, key="large")
        torch.cuda.synchronize()
        assert all(torch.equal(o, t) for o, t in zip(outs_s + outs_l, small + large, strict=True))
        for o in outs_s + outs_l:
            o.zero_()
    single = codec.decode(cl[1])
    assert torch.equal(single, large[1])
    codec.close()


def test_row_aligned_chunks_hold_whole_rows():
    from harness.codecs.nvcomp_layout import row_aligned_chunk_bytes
    assert row_aligned_chunk_bytes((128256, 2048), 2, 1 << 18) == 1 << 18  # 64 rows of 4 KiB
    assert row_aligned_chunk_bytes((49152, 576), 2, 1 << 18) == 1152 * 227  # SmolLM2: 227 rows of 1152 B
    assert row_aligned_chunk_bytes((10, 1 << 20), 2, 1 << 18) == 1 << 18  # rows larger than a chunk
    assert row_aligned_chunk_bytes((1000,), 2, 1 << 18) == 1 << 18


@pytest.mark.gpu
@RunIf(min_gpus=1)
@pytest.mark.parametrize("policy,options", [("block", {}), ("block", {"ahead": 1}), ("none", {})])
def test_compressed_embedding_rows_decode_bit_exact_on_cuda(policy, options):
    """GPU-resident embedding table: after the verifying first lookup, each lookup decodes only its rows'
    chunks (decode_rows); every output bit-identical, one decompression per pass."""
    loaded = tiny_llama(seed=0, device="cuda")
    prompts = ["The capital of France is", "Lossless"]
    ref = greedy_generate(loaded.model, loaded.tokenizer, prompts, 5, 5)
    model = copy.deepcopy(loaded.model)
    codec = make_codec("nvcomp_ans_batched", chunk_bytes=1 << 12)
    runtime = compress_model(model, codec, policy=policy, policy_options=options, placement="gpu", layers="all",
                             embeddings=True, progress=False)
    calls = []
    original = codec.decode_rows
    codec.decode_rows = lambda ct, ids: calls.append(ids.numel()) or original(ct, ids)
    out = greedy_generate(model, loaded.tokenizer, prompts, 5, 5)
    runtime.end_generation()
    assert torch.equal(out.logits, ref.logits) and out.new_token_ids == ref.new_token_ids
    assert runtime.stats.decompressions_per_layer["model.embed_tokens"] == 5
    assert calls == [2, 2, 2, 2]  # the prefill verified the whole table; then 2 rows (one per sequence) a step
    runtime.close()


@pytest.mark.gpu
@RunIf(min_gpus=1)
@pytest.mark.parametrize("policy", ["block", "none", "per_forward_pass"])
def test_compiled_capturable_decode_replays_bit_exact_on_cuda(policy):
    """generate.compile=true on CUDA: nvCOMP's decode captured in the CUDA graphs of transformers' compiled step;
    bit-exact with the compiled dense model, exact counts from the device counters, really graph-replayed."""
    from harness.phases.compiled import compile_mode, release_compiled, reset_compile_counters

    loaded = tiny_llama(seed=0, device="cuda")
    prompts, n = ["The capital of France is"], 6
    reset_compile_counters()
    ref = [greedy_generate(loaded.model, loaded.tokenizer, prompts, n, min_new_tokens=n, compile=True) for _ in range(3)][-1]
    assert compile_mode(torch.device("cuda")) == "cudagraphs"
    release_compiled(loaded.model)
    model = copy.deepcopy(loaded.model)
    rt = compress_model(model, make_codec("nvcomp_ans_batched"), policy=policy, placement="gpu", layers="all",
                        captured=True, progress=False)
    reset_compile_counters()
    for _ in range(3):
        rt.reset_stats()
        out = greedy_generate(model, loaded.tokenizer, prompts, n, min_new_tokens=n, compile=True)
        rt.end_generation()
        assert out.new_token_ids == ref.new_token_ids
        assert torch.equal(out.logits, ref.logits)
        assert rt.stats.snapshot()["decompressions_per_pass"] == [len(rt.layers)] * n
    assert compile_mode(torch.device("cuda")) == "cudagraphs"
    rt.close()
    release_compiled(model)


# -- fused_lut3 + cache=fused: the lut3 kernel multiplies with the weights it decodes in registers (issue 12) -------
def _lut3_llama(arch: str):
    """The tiny Llama (K = 64, 128: one k-iteration per warp), or one wide enough for split-K (K = 256, 512)."""
    wide = dict(hidden_size=256, intermediate_size=512) if arch == "wide" else {}
    return tiny_llama(seed=0, device="cuda", **wide)


def _fused(loaded, captured=False, **options):
    model = copy.deepcopy(loaded.model)
    runtime = compress_model(model, make_codec("fused_lut3"), policy="fused", placement="gpu", layers="all",
                             captured=captured, policy_options=options, progress=False)  # fmt: skip
    return model, runtime


@pytest.mark.gpu
@RunIf(min_gpus=1)
@pytest.mark.parametrize("shape", [(16, 64), (259, 64), (4096, 4096), (1000, 14336), (40, 320)])
def test_lut3_decode_gpu_is_bit_exact(shape):
    """The decode kernel's output equals W bit for bit; the GPU encoder writes the CPU encoder's bytes. (40, 320):
    a partial last tile and a last chunk of one iteration (5 iterations, chunks of DECODE_CHUNK = 4)."""
    from harness.fused import lut3_cuda

    g = torch.Generator().manual_seed(shape[0])
    w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    codec = make_codec("fused_lut3")
    ct_cpu, ct_gpu = codec.encode(w), codec.encode(w.cuda())
    assert ct_gpu.payload.is_cuda and torch.equal(ct_gpu.payload.cpu(), ct_cpu.payload) and ct_gpu.meta == ct_cpu.meta
    got = lut3_cuda.decode_gpu(codec.packed(ct_gpu))
    assert torch.equal(got.cpu().view(torch.int16), w.view(torch.int16))
    assert torch.equal(codec.decode(ct_cpu).cpu().view(torch.int16), w.view(torch.int16))  # bytes in host memory


def _gemv_case(rows: int, tokens: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """x [tokens, 1024] and two bf16 [rows, 1024] weights: normal(0, 0.02) (a few % escapes) and escape-dense
    (exponents spread over ~20 values: more than a window's 7 escapes per lane), seeded by `tokens`."""
    g = torch.Generator(device="cuda").manual_seed(tokens)
    normal = torch.randn(rows, 1024, device="cuda", generator=g) * 0.02
    dense_escapes = normal * torch.exp2(torch.randint(-10, 10, normal.shape, device="cuda", generator=g).float())
    x = torch.randn(tokens, 1024, device="cuda", generator=g).to(torch.bfloat16)
    return x, (normal.to(torch.bfloat16), dense_escapes.to(torch.bfloat16))


@pytest.mark.gpu
@RunIf(min_gpus=1)
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_every_fused_kernel_equals_the_reference_kernel(tokens):
    """Each fused variant (registers as allocated, held to 72) gives the reference kernel's output bit for bit, at
    every warp count, on weights with escapes and on escape-dense ones (more than a window's 7 per lane)."""
    from harness.fused import lut3, lut3_cuda

    x, weights = _gemv_case(512, tokens)
    for w in weights:
        p, ref = lut3.encode(w), lut3_cuda.reference_inputs(w)
        for warps in (1, 4, 16):
            want = lut3_cuda.reference_gemv(x, ref, warps=warps)
            for kernel in lut3_cuda.FUSED_KERNELS:
                assert torch.equal(lut3_cuda.gemv(x, p, warps=warps, kernel=kernel), want), (kernel, warps)


@pytest.mark.gpu
@RunIf(min_gpus=1)
@pytest.mark.parametrize("tokens", [9, 16, 24, 32])
def test_wide_kernel_equals_its_reference_and_the_float64_product(tokens):
    """The wide builds (9-32 tokens in one launch; lane's and ballot's) give their reference kernel's output bit for
    bit at every warp count, on normal and escape-dense weights, and x @ W.T within bf16 rounding of the float64
    product (a wrong token group or partial-sum layout would be O(1)); a partial last tile (N = 300) included."""
    from harness.fused import lut3, lut3_cuda

    x, weights = _gemv_case(300, tokens)
    for w in weights:
        p, ref = lut3.encode(w), lut3_cuda.reference_inputs(w)
        exact = x.double() @ w.double().T
        for warps in (1, 4, 16):
            want = lut3_cuda.reference_gemv(x, ref, warps=warps)
            for kernel in ("lut3_gemv", "lut3_gemvb"):
                y = lut3_cuda.gemv(x, p, warps=warps, kernel=kernel)
                assert torch.equal(y, want), (kernel, warps)
                rel = ((y.double() - exact).norm() / exact.norm()).item()
                assert rel < 1e-2, (kernel, warps, rel)


@pytest.mark.gpu
@RunIf(min_gpus=1)
def test_prepared_gemv_equals_the_op_and_counts_its_launches():
    """lut3_cuda.Gemv (launches prepared once, the eager paths' route) gives the op's output bit for bit at every
    token count, and adds 1 per launch to the int64 at its counter address; reused, it rewrites only x, M and y."""
    from harness.fused import lut3, lut3_cuda

    g = torch.Generator(device="cuda").manual_seed(7)
    w = (torch.randn(300, 1024, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    p = lut3.encode(w)
    counts = torch.zeros(4, dtype=torch.int64, device="cuda")
    prepared = lut3_cuda.Gemv(lut3_cuda.addresses(p), list(p.lut_words()), *p.shape, counts.data_ptr() + 2 * 8)
    for tokens in range(1, lut3_cuda.WIDE_TOKENS + 1):  # past 8: the wide build
        x = torch.randn(tokens, 1024, device="cuda", generator=g).to(torch.bfloat16)
        want = torch.ops.codecllm.lut3_linear(x, lut3_cuda.addresses(p), list(p.lut_words()), 300, counts, 0)
        assert torch.equal(prepared(x), want), tokens
        assert torch.equal(prepared(x), want), tokens  # the same prepared launch, called again
    assert counts.tolist() == [32, 0, 64, 0]


@pytest.mark.gpu
@RunIf(min_gpus=1)
def test_lut3_decode_gpu_keeps_every_bit_pattern():
    from harness.fused import lut3_cuda

    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(512, 128)
    codec = make_codec("fused_lut3")
    assert torch.equal(codec.decode(codec.encode(every.cuda())).cpu().view(torch.int16), every.view(torch.int16))
    p = codec.packed(codec.encode(every.cuda()))  # escape-dense: lanes past the window's 7
    assert torch.equal(lut3_cuda.decode_gpu(p).cpu().view(torch.int16), every.view(torch.int16))


@pytest.mark.gpu
@RunIf(min_gpus=1)
@pytest.mark.parametrize("arch", ["tiny", "wide"])
@pytest.mark.parametrize("prompts", [["The capital of France is", "Lossless"], ["Hi"]])
def test_fused_policy_equals_its_reference_with_exact_counts_on_cuda(arch, prompts):
    """Decode steps (<= 8 tokens) in the kernel, a longer prefill decoded + F.linear (cache.prefill_tokens=0: the
    route a prompt longer than the wide build's 32 tokens takes); logits torch.equal to the
    same kernel fed the uncompressed weights; counts exact per pass; close to dense (the kernel's arithmetic)."""
    from harness.exactness import exactness_reference
    from harness.phases.module import GenerationModule

    loaded, n = _lut3_llama(arch), 6
    dense = greedy_generate(loaded.model, loaded.tokenizer, prompts, n, n)
    model, runtime = _fused(loaded, prefill_tokens=0)
    assert runtime.lossless() == {"weights_lossless": True, "weights_checked_layers": len(runtime.layers)}
    layers = len(runtime.layers)
    tiles = sum(-(-layer.out_features // 16) for layer in runtime.layers)
    long_prefill = len(loaded.tokenizer(prompts, padding=True)["input_ids"][0]) * len(prompts) > 8
    # A long prefill is decoded + F.linear, except the lm_head: the model asks logits of the last position only, so
    # its input has one token per prompt and goes through the kernel like a decode step.
    head = [layer for layer in runtime.layers if layer.name.endswith("lm_head")]
    first = {layer.name: int(not long_prefill or layer in head) for layer in runtime.layers}
    for _ in range(2):
        runtime.reset_stats()
        out = greedy_generate(model, loaded.tokenizer, prompts, n, n)
        runtime.end_generation()
        s = runtime.stats.snapshot()
        in_kernel = [sum(first.values())] + [layers] * (n - 1)
        assert s["in_kernel_decodes_per_pass"] == in_kernel
        assert s["in_kernel_tiles"] == tiles * (n - 1) + sum(-(-layer.out_features // 16) * first[layer.name]
                                                             for layer in runtime.layers)
        assert s["decompressions_per_pass"] == [layers - in_kernel[0]] + [0] * (n - 1)
        assert s["in_kernel_decodes_per_layer"] == {name: n - 1 + f for name, f in first.items()}
    with runtime.policy.reference():
        reference = greedy_generate(model, loaded.tokenizer, prompts, n, n)
    assert torch.equal(out.logits, reference.logits)
    module = GenerationModule(model, loaded.tokenizer, n, n)
    assert exactness_reference(module, runtime, prompts, out) is True
    module.close()
    if long_prefill:  # the prefill is dense arithmetic on the decoded weights: bit-identical
        assert torch.equal(out.logits[0], dense.logits[0])
    step = 1 if long_prefill else 0  # the first in-kernel step, from the same context as dense
    diff = (out.logits[step].float() - dense.logits[step].float()).abs().max()
    assert diff <= 0.05 * dense.logits[step].float().abs().max()  # a wrong decode or layout would be O(1)
    runtime.close()


@pytest.mark.gpu
@RunIf(min_gpus=1)
@pytest.mark.parametrize("captured", [False, True])
def test_every_kernel_family_gives_the_same_logits_through_the_policy(captured):
    """cache.kernel reaches the kernel: each family's prepared launches (eager) and op calls (compiled) run its own
    build, and all give the logits of the lane family bit for bit (the same arithmetic, another way to load)."""
    from harness.fused import lut3_cuda

    loaded, n = _lut3_llama("wide"), 4
    outs = {}
    for kernel in lut3_cuda.FAMILIES:
        model = copy.deepcopy(loaded.model)
        runtime = compress_model(model, make_codec("fused_lut3"), policy="fused", placement="gpu", layers="all",
                                 captured=captured, policy_options={"kernel": kernel}, progress=False)  # fmt: skip
        outs[kernel] = greedy_generate(model, loaded.tokenizer, ["Hi"], n, n, compile=captured,
                                       deterministic=captured)  # fmt: skip
        if not captured:  # the functions the prepared launches call: the family's build for their token count
            funcs = lut3_cuda.kernels()
            launches = [(t, launch) for g in runtime.policy._gemv.values() for t, launch in g._launches.items()]
            assert launches
            for t, launch in launches:
                want = f"{lut3_cuda.fused_kernel(t, kernel)}_m{t}"  # the choice itself: test_fused_lut3.py
                assert launch._func == funcs[want].func, (want, t)
        runtime.close()
    for kernel in ("ballot", "chunk", "prefetch"):
        assert torch.equal(outs[kernel].logits, outs["lane"].logits), kernel


@pytest.mark.gpu
@RunIf(min_gpus=1)
@pytest.mark.parametrize("captured", [False, True])
def test_pdl_launches_give_the_same_logits_and_counts(captured):
    """cache.pdl=true: every kernel launch may overlap the one before it (programmatic dependent launch) and waits
    for its input in the kernel. The logits and the in-kernel counts equal those of plain launches bit for bit,
    eager and compiled (a launch that read x or wrote y too early would not), and the exactness reference, launched
    the same way, holds."""
    from harness.exactness import exactness_reference
    from harness.fused import lut3_cuda
    from harness.phases.module import GenerationModule

    if not lut3_cuda.pdl_supported(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    loaded, prompts, n = _lut3_llama("wide"), ["Hi", "The capital of France is"], 6
    outs, counts = {}, {}
    for pdl in (False, True):
        model, runtime = _fused(loaded, captured=captured, pdl=pdl)
        assert runtime.policy.pdl is pdl
        for _ in range(2 if captured else 1):  # compiled: the second generation replays the graphs
            runtime.reset_stats()
            outs[pdl] = greedy_generate(model, loaded.tokenizer, prompts, n, n, compile=captured,
                                        deterministic=captured)  # fmt: skip
            runtime.end_generation()
        counts[pdl] = runtime.stats.snapshot()["in_kernel_decodes_per_pass"]
        if not captured:  # the prepared launches are the extended ones exactly when pdl is on
            launches = [launch for g in runtime.policy._gemv.values() for launch in g._launches.values()]
            assert launches and all((launch._config is not None) is pdl for launch in launches)
        module = GenerationModule(model, loaded.tokenizer, n, n, compile=captured)
        assert exactness_reference(module, runtime, prompts, outs[pdl]) is True
        module.close()  # the compiled graphs are released by exactness_reference
        runtime.close()
    assert counts[True] == counts[False] and sum(counts[True]) > 0
    assert torch.equal(outs[True].logits, outs[False].logits)


@pytest.mark.gpu
@RunIf(min_gpus=1)
@pytest.mark.parametrize("options", [{"prefill_slices": 4, "prefill_tokens": 0}, {}], ids=["sliced", "default"])
def test_fused_prefill_runs_the_prompt_in_the_kernel_on_cuda(options):
    """cache.prefill_slices: a prompt of up to 8 x S tokens goes through the kernel 8 tokens a launch; the default
    (cache.prefill_tokens=32): up to 32 in one launch of the wide build. Nothing is decoded at all; counts are launches
    (per layer in the prefill: ceil(tokens / 8) sliced, 1 wide; the lm_head's one position: 1); logits torch.equal
    to the reference (which routes the same way) and close to dense."""
    from harness.exactness import exactness_reference
    from harness.phases.module import GenerationModule

    loaded, prompts, n = _lut3_llama("wide"), ["The capital of France is"], 4
    tokens = len(loaded.tokenizer(prompts)["input_ids"][0])
    assert 8 < tokens <= 32
    dense = greedy_generate(loaded.model, loaded.tokenizer, prompts, n, n)
    model = copy.deepcopy(loaded.model)
    runtime = compress_model(model, make_codec("fused_lut3"), policy="fused", placement="gpu", layers="all",
                             policy_options=options, progress=False)  # fmt: skip
    runtime.reset_stats()
    out = greedy_generate(model, loaded.tokenizer, prompts, n, n)
    runtime.end_generation()
    s = runtime.stats.snapshot()
    head = {layer.name for layer in runtime.layers if layer.name.endswith("lm_head")}
    launches = -(-tokens // 8) if options.get("prefill_slices") else 1
    first = {layer.name: 1 if layer.name in head else launches for layer in runtime.layers}
    assert s["decompressions_per_pass"] == [0] * n
    assert s["in_kernel_decodes_per_pass"] == [sum(first.values())] + [len(runtime.layers)] * (n - 1)
    assert s["in_kernel_decodes_per_layer"] == {name: f + n - 1 for name, f in first.items()}
    module = GenerationModule(model, loaded.tokenizer, n, n)
    assert exactness_reference(module, runtime, prompts, out) is True
    module.close()
    diff = (out.logits[0].float() - dense.logits[0].float()).abs().max()
    assert diff <= 0.05 * dense.logits[0].float().abs().max()  # a wrong slice would be O(1)
    runtime.close()


@pytest.mark.gpu
@RunIf(min_gpus=1)
@pytest.mark.parametrize("prefill_tokens", [0, 32], ids=["decoded_prefill", "default"])
def test_fused_compiled_replays_with_exact_counts_and_its_reference_on_cuda(prefill_tokens):
    """generate.compile=true: the op is captured in the CUDA graphs; counts exact from the device counters, logits
    torch.equal to the compiled reference run. The eager prefill (more than 8 tokens) decodes with
    cache.prefill_tokens=0 and runs in the wide build by default."""
    from harness.exactness import exactness_reference
    from harness.phases.compiled import compile_mode, release_compiled, reset_compile_counters
    from harness.phases.module import GenerationModule

    loaded, prompts, n = _lut3_llama("wide"), ["The capital of France is"], 6
    model, runtime = _fused(loaded, captured=True, prefill_tokens=prefill_tokens)
    layers = len(runtime.layers)
    # the prefill's launches: with prefill_tokens=0 only the lm_head's, which sees the last position only (one token),
    # the other layers decoded; by default every layer's, one launch of the wide build each
    first = sum(layer.name.endswith("lm_head") for layer in runtime.layers) if prefill_tokens == 0 else layers
    reset_compile_counters()
    for _ in range(3):
        runtime.reset_stats()
        out = greedy_generate(model, loaded.tokenizer, prompts, n, min_new_tokens=n, compile=True)
        runtime.end_generation()
        s = runtime.stats.snapshot()
        assert s["in_kernel_decodes_per_pass"] == [first] + [layers] * (n - 1)
        assert s["decompressions_per_pass"] == [layers - first] + [0] * (n - 1)
    assert compile_mode(torch.device("cuda")) == "cudagraphs"
    module = GenerationModule(model, loaded.tokenizer, n, n, compile=True)
    assert exactness_reference(module, runtime, prompts, out) is True
    module.close()
    runtime.close()
    release_compiled(model)


@pytest.mark.gpu
@RunIf(min_gpus=1)
def test_fused_experiment_runs_compiled_end_to_end(harness_cli, tmp_path):
    import json

    proc = harness_cli(["experiment=fused", "model=tiny", "generate.compile=true", "logger=none", "generate.repeats=2",
                        "generate.max_new_tokens=6", "generate.min_new_tokens=6", f"hydra.run.dir={tmp_path}",
                        f"compress.artifact_dir={tmp_path / 'art'}"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    comp, cmp_ = res["compressed"], res["comparison"]
    per_pass = comp["in_kernel_decodes_per_pass"]
    # the prefill: 15 in the kernel if the prompts have <= 32 tokens together (the wide build), else only the lm_head
    # (the last position's logits)
    assert comp["compile"] == "cudagraphs" and per_pass[1:] == [15] * 5 and per_pass[0] in (1, 15)
    assert cmp_["weights_lossless"] is True and cmp_["exactness_reference"] is True
    assert 0 < cmp_["token_agreement"] <= 1
    # the summary pads labels to its widest one: match the line, not a fixed run of spaces
    line = re.search(r"^exactness reference\s+(\S+)", proc.stdout, re.M)
    assert line and line.group(1) == "✓", proc.stdout[-2500:]
