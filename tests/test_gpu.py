"""GPU paths: CPU-side checks run everywhere; the CUDA ones skip cleanly on machines without a GPU."""

import copy

import pytest
import torch

from harness.codecs import make_codec
from harness.errors import HarnessError
from harness.generation import greedy_generate
from harness.models import tiny_llama
from harness.runtime import compress_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
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
@cuda
@pytest.mark.parametrize("placement,policy,options", [
    ("gpu", "none", {}), ("gpu", "block", {}), ("gpu", "block", {"ahead": 1}), ("cpu", "prefetch", {"depth": 2}),
    ("cpu", "block", {"ahead": 1}),
])
def test_nvcomp_is_bit_exact_on_cuda(placement, policy, options):
    loaded = tiny_llama(seed=0, device="cuda")
    prompts = ["The capital of France is", "Lossless"]
    ref = greedy_generate(loaded.model, loaded.tokenizer, prompts, 5, 5)
    model = copy.deepcopy(loaded.model)
    runtime = compress_model(model, make_codec("nvcomp_ans"), policy=policy, policy_options=options,
                             placement=placement, layers="all", progress=False)
    out = greedy_generate(model, loaded.tokenizer, prompts, 5, 5)
    runtime.end_generation()
    assert torch.equal(out.logits, ref.logits) and out.new_token_ids == ref.new_token_ids
    assert all(layer.ct.payload.is_cuda == (placement == "gpu") for layer in runtime.layers)
    runtime.close()
