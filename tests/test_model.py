"""Properties of the model: attention against independent references, causality, padding
invariance, cached decoding, and that both norm placements learn."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnmt.model import KVCache, MultiHeadAttention, build_model
from attnmt.tokenizer import BOS_ID, EOS_ID, PAD_ID
from conftest import tiny_config


def padded_batch(lengths: list[int], vocab: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (B, max_len) ending with EOS, right-padded with PAD, and their mask."""
    tokens = torch.full((len(lengths), max(lengths)), PAD_ID)
    for i, n in enumerate(lengths):
        tokens[i, : n - 1] = torch.randint(4, vocab, (n - 1,))
        tokens[i, n - 1] = EOS_ID
    return tokens, tokens != PAD_ID


def copy_weights_to_torch_mha(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        theirs.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.kv_proj.weight]))
        theirs.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.kv_proj.bias]))
        theirs.out_proj.weight.copy_(ours.out_proj.weight)
        theirs.out_proj.bias.copy_(ours.out_proj.bias)


@pytest.mark.parametrize("cross", [False, True])
def test_attention_equals_torch_multihead_attention(cross: bool) -> None:
    d, h = 32, 4
    ours = MultiHeadAttention(d, h, cross=cross).eval()
    for p in ours.parameters():  # non-zero biases too, so their placement is checked
        nn.init.normal_(p, std=0.3)
    theirs = nn.MultiheadAttention(d, h, batch_first=True).eval()
    copy_weights_to_torch_mha(ours, theirs)
    x = torch.randn(3, 5, d)
    memory = torch.randn(3, 7, d) if cross else x
    key_mask = torch.ones(3, memory.size(1), dtype=torch.bool)
    key_mask[0, -3:] = False
    key_mask[2, -1:] = False
    expected, _ = theirs(x, memory, memory, key_padding_mask=~key_mask, need_weights=False)
    got = ours(x, memory if cross else None, key_mask=key_mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_attention_equals_float64_formula() -> None:
    d, h = 32, 4
    mha = MultiHeadAttention(d, h, cross=True).double().eval()
    x, memory = torch.randn(2, 6, d, dtype=torch.float64), torch.randn(2, 9, d, dtype=torch.float64)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, 5:] = False

    q = (x @ mha.q_proj.weight.T + mha.q_proj.bias).view(2, 6, h, d // h).transpose(1, 2)
    k, v = (memory @ mha.kv_proj.weight.T + mha.kv_proj.bias).chunk(2, dim=-1)
    k = k.reshape(2, 9, h, d // h).transpose(1, 2)
    v = v.reshape(2, 9, h, d // h).transpose(1, 2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d // h)
    scores = scores.masked_fill(~key_mask[:, None, None, :], -math.inf)
    heads = scores.softmax(-1) @ v  # (B, H, T, Dh)
    expected = heads.transpose(1, 2).reshape(2, 6, d) @ mha.out_proj.weight.T + mha.out_proj.bias

    torch.testing.assert_close(mha(x, memory, key_mask=key_mask), expected, atol=1e-10, rtol=1e-10)
    weights = mha.attention_weights(x, memory, key_mask)
    torch.testing.assert_close(weights, scores.softmax(-1), atol=1e-10, rtol=1e-10)


def test_head_size_must_divide_model_width() -> None:
    with pytest.raises(ValueError, match=r"d_model=30 is not divisible by model.n_heads=4"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="n_heads"):
        build_model(tiny_config(d_model=30, n_heads=4))


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("positions", ["sinusoidal_fairseq", "sinusoidal", "learned"])
def test_decoder_is_causal(norm_first: bool, positions: str) -> None:
    model = build_model(tiny_config(norm_first=norm_first, positions=positions)).eval()
    src, src_mask = padded_batch([7, 5])
    tgt = torch.randint(4, 24, (2, 8))
    logits = model(src, src_mask, tgt)
    for t in range(7):
        changed = tgt.clone()
        changed[:, t + 1 :] = torch.randint(4, 24, changed[:, t + 1 :].shape)
        assert not torch.equal(changed, tgt)
        torch.testing.assert_close(model(src, src_mask, changed)[:, : t + 1], logits[:, : t + 1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm_first", [True, False])
def test_padding_changes_no_output(norm_first: bool) -> None:
    model = build_model(tiny_config(norm_first=norm_first, share_embeddings=False, tie_output=False)).eval()
    src, src_mask = padded_batch([4, 9, 6])
    tgt, _ = padded_batch([5, 3, 8])
    tgt[:, 0] = BOS_ID
    memory = model.encode(src, src_mask)
    logits = model.decode(tgt, memory, src_mask)
    for i in range(3):
        s, t = int(src_mask[i].sum()), int((tgt[i] != PAD_ID).sum())
        alone_memory = model.encode(src[i : i + 1, :s], src_mask[i : i + 1, :s])
        torch.testing.assert_close(memory[i : i + 1, :s], alone_memory, atol=1e-5, rtol=0)
        alone_logits = model.decode(tgt[i : i + 1, :t], alone_memory, src_mask[i : i + 1, :s])
        torch.testing.assert_close(logits[i : i + 1, :t], alone_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm_first", [True, False])
def test_cached_decoding_equals_teacher_forcing(norm_first: bool) -> None:
    model = build_model(tiny_config(norm_first=norm_first)).eval()
    src, src_mask = padded_batch([6, 9, 3])
    tgt = torch.cat([torch.full((3, 1), BOS_ID), torch.randint(4, 24, (3, 11))], dim=1)
    memory = model.encode(src, src_mask)
    full = model.decode(tgt, memory, src_mask)

    cache = model.new_cache()
    steps = [model.decode(tgt[:, t : t + 1], memory, src_mask, cache) for t in range(tgt.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.seq_len == tgt.size(1)

    # Several positions at once after a cached prefix (causal among themselves) agree as well.
    cache = model.new_cache()
    first = model.decode(tgt[:, :4], memory, src_mask, cache)
    rest = model.decode(tgt[:, 4:], memory, src_mask, cache)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=0)


def test_cache_reorder_follows_rows() -> None:
    model = build_model(tiny_config()).eval()
    src, src_mask = padded_batch([6, 9, 3])
    tgt = torch.cat([torch.full((3, 1), BOS_ID), torch.randint(4, 24, (3, 5))], dim=1)
    memory = model.encode(src, src_mask)
    index = torch.tensor([2, 0, 0, 1])
    expected = model.decode(tgt[index], memory[index], src_mask[index])

    cache = model.new_cache()
    model.decode(tgt[:, :3], memory, src_mask, cache)
    cache.reorder(index)
    got = model.decode(tgt[index, 3:], memory[index], src_mask[index], cache)
    torch.testing.assert_close(got, expected[:, 3:], atol=1e-5, rtol=0)


def test_kv_cache_grows_past_its_capacity() -> None:
    cache = KVCache(n_layers=1)
    ks = [torch.randn(2, 2, 1, 4) for _ in range(40)]
    for k in ks:
        all_k, all_v = cache.append(0, k, -k)
    assert torch.equal(all_k, torch.cat(ks, dim=2))
    assert torch.equal(all_v, -torch.cat(ks, dim=2))


def test_kv_cache_reorder_keeps_exact_values() -> None:
    # A reference that keeps whole tensors and gathers them: the cache agrees bit for bit through
    # appends and reorders that permute, repeat and drop rows and change the beams per sentence.
    cache = KVCache(n_layers=1, max_len=6)
    memory_k, memory_v, src_mask = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4), torch.rand(3, 5) > 0.3
    cache.cross[0], cache.src_mask = (memory_k, memory_v), src_mask  # (N, H, S, Dh), (N, S)
    ref_k = ref_v = torch.empty(3, 2, 0, 4)
    row_sentence = torch.arange(3)  # the source sentence of each row
    reorders = [
        (torch.tensor([0, 0, 1, 1, 2, 2]), 2),  # one row per sentence -> two beams each
        (torch.tensor([1, 0, 3, 3, 4, 5]), None),  # beams swap and repeat; every sentence stays
        (torch.tensor([0, 1, 4, 4]), None),  # sentence 1 leaves
        (torch.tensor([3, 2, 1, 1]), None),  # the two sentences swap places
        (torch.tensor([2, 1]), 1),  # one beam per sentence
    ]
    for step in range(len(reorders) + 1):
        new_k, new_v = torch.randn(ref_k.size(0), 2, 1, 4), torch.randn(ref_k.size(0), 2, 1, 4)
        got_k, got_v = cache.append(0, new_k, new_v)
        ref_k, ref_v = torch.cat([ref_k, new_k], dim=2), torch.cat([ref_v, new_v], dim=2)
        assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v), step
        if step == len(reorders):
            break
        index, beams = reorders[step]
        cross_before = cache.cross[0][0]
        cache.reorder(index, beams)
        ref_k, ref_v, row_sentence = ref_k[index], ref_v[index], row_sentence[index]
        sentences = row_sentence[:: cache.beams]
        assert torch.equal(cache.cross[0][0], memory_k[sentences]) and torch.equal(cache.cross[0][1], memory_v[sentences])
        assert torch.equal(cache.src_mask, src_mask[sentences])
        if step == 1:  # no sentence left: the per-sentence state was not copied
            assert cache.cross[0][0] is cross_before
    assert cache.seq_len == len(reorders) + 1


def test_kv_cache_reorder_refuses_groups_that_mix_sentences() -> None:
    cache = KVCache(n_layers=1)
    cache.append(0, torch.randn(4, 2, 1, 4), torch.randn(4, 2, 1, 4))
    cache.reorder(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), beams=2)
    with pytest.raises(ValueError, match="more than one sentence"):
        cache.reorder(torch.tensor([0, 2, 4, 5]))  # rows 0 and 2 are beams of sentences 0 and 1
    with pytest.raises(ValueError, match="groups of 2"):
        cache.reorder(torch.tensor([0, 1, 2]))


def test_kv_cache_steps_reuse_two_buffers() -> None:
    # Preallocated for the whole target, appends write in place and reorders swap two buffers: a
    # step allocates no new self-attention buffer, even as rows leave.
    cache = KVCache(n_layers=1, max_len=10)
    cache.append(0, torch.randn(6, 2, 1, 4), torch.randn(6, 2, 1, 4))
    storages = set()
    for rows in [6, 6, 5, 5, 3, 3, 1]:
        cache.reorder(torch.randperm(cache.rows)[:rows].sort().values)
        k, _ = cache.append(0, torch.randn(rows, 2, 1, 4), torch.randn(rows, 2, 1, 4))
        storages.add(k.untyped_storage().data_ptr())
    assert len(storages) == 2


def test_cached_decoding_of_beams_equals_teacher_forcing() -> None:
    # Beams folded into cross-attention's query dimension attend as if each had its own copy of the
    # memory and mask, through beam reorders and a sentence leaving.
    model = build_model(tiny_config()).eval()
    src, src_mask = padded_batch([6, 9, 3])
    memory = model.encode(src, src_mask)
    cache = model.new_cache(max_len=5)
    tgt = torch.cat([torch.full((6, 1), BOS_ID), torch.randint(4, 24, (6, 4))], dim=1)  # 2 beams per sentence
    tgt[1::2, 0] = BOS_ID
    rows = torch.tensor([0, 0, 1, 1, 2, 2])  # each row's sentence
    logits = [model.decode(tgt[::2, :1], memory, src_mask, cache)[rows]]  # the first step once per sentence
    cache.reorder(rows, beams=2)
    history = torch.arange(6)  # the row of tgt each cache row continues
    for t, index in [(1, None), (2, torch.tensor([1, 1, 2, 3, 5, 4])), (3, torch.tensor([0, 1, 4, 5])), (4, None)]:
        if index is not None:
            cache.reorder(index)
            history, logits = history[index], [step[index] for step in logits]
        logits.append(model.decode(tgt[history, t : t + 1], memory, src_mask, cache))
    full = model.decode(tgt[history], memory[history // 2], src_mask[history // 2])
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=0)


def test_shared_and_tied_embeddings_are_one_tensor() -> None:
    model = build_model(tiny_config(share_embeddings=True, tie_output=True))
    assert model.src_embed.tokens is model.tgt_embed.tokens
    assert model.output_proj is None
    untied = build_model(tiny_config(share_embeddings=False, tie_output=False))
    assert untied.num_parameters() == model.num_parameters() + 2 * 24 * 32
    with pytest.raises(ValueError, match="joint vocabulary"):
        build_model(tiny_config(share_embeddings=True, src_vocab_size=30))


def test_position_tables_follow_their_definitions() -> None:
    from attnmt.model.transformer import fairseq_sinusoidal_positions, sinusoidal_positions

    p = torch.arange(40, dtype=torch.float64)[:, None]
    i = torch.arange(8, dtype=torch.float64)[None, :]
    # Vaswani et al.: sin and cos of p / 10000^(2i/d), interleaved.
    interleaved = sinusoidal_positions(40, 16).double()
    torch.testing.assert_close(interleaved[:, 0::2], torch.sin(p / 10000 ** (2 * i / 16)), atol=1e-5, rtol=0)
    torch.testing.assert_close(interleaved[:, 1::2], torch.cos(p / 10000 ** (2 * i / 16)), atol=1e-5, rtol=0)
    # fairseq: all sines then all cosines of (p + pad + 1) * 10000^(-i/(d/2 - 1)).
    fairseq = fairseq_sinusoidal_positions(40, 16, pad_id=0).double()
    angles = (p + 1) * 10000 ** (-i / 7)
    torch.testing.assert_close(fairseq, torch.cat([torch.sin(angles), torch.cos(angles)], dim=1), atol=1e-5, rtol=0)


def test_new_runs_get_fairseq_positions_and_older_checkpoints_keep_theirs() -> None:
    """Every checkpoint written before sinusoidal_fairseq existed says positions=sinusoidal; it must
    still get the interleaved table it was trained with."""
    from attnmt.model.transformer import fairseq_sinusoidal_positions, sinusoidal_positions

    shipped = build_model(tiny_config())
    assert shipped.cfg.positions == "sinusoidal_fairseq"
    assert torch.equal(shipped.src_embed.sinusoids, fairseq_sinusoidal_positions(shipped.cfg.max_positions, 32, 0))
    older = build_model(tiny_config(positions="sinusoidal"))
    assert torch.equal(older.src_embed.sinusoids, sinusoidal_positions(older.cfg.max_positions, 32))


def test_positions_beyond_the_limit_fail_clearly() -> None:
    model = build_model(tiny_config(max_positions=8)).eval()
    src, src_mask = padded_batch([9])
    with pytest.raises(ValueError, match="exceeds model.max_positions=8"):
        model.encode(src, src_mask)


def test_training_flops_grow_with_lengths_and_size() -> None:
    small, big = build_model(tiny_config()), build_model(tiny_config(d_model=64, ffn_dim=128))
    assert big.training_flops(10, 10) > small.training_flops(10, 10)
    assert small.training_flops(20, 10) > small.training_flops(10, 10)
    # Without attention and the output layer it is 6 x (matmul parameters) x tokens.
    cfg = small.cfg
    per_layer_enc = 4 * cfg.d_model**2 + 2 * cfg.d_model * cfg.ffn_dim
    expected_enc = 6 * cfg.encoder_layers * per_layer_enc * 10 + 3 * cfg.encoder_layers * 10 * 4 * 10 * cfg.d_model
    zero_tgt = small.training_flops(10, 0) - 3 * cfg.decoder_layers * 10 * 4 * cfg.d_model**2
    assert zero_tgt == expected_enc


def train_copy_task(norm_first: bool, steps: int = 300) -> float:
    """Train a tiny model to copy random sequences; return the mean loss of the last 20 steps."""
    torch.manual_seed(0)
    model = build_model(tiny_config(norm_first=norm_first))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:  # linear warm-up: post-norm needs it
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 50)
        src, src_mask = padded_batch([int(n) for n in torch.randint(4, 9, (32,))])
        tgt_in = torch.cat([torch.full((32, 1), BOS_ID), src[:, :-1]], dim=1)
        tgt_in = tgt_in.masked_fill(tgt_in == EOS_ID, PAD_ID)
        logits = model(src, src_mask, tgt_in)
        loss = F.cross_entropy(logits.flatten(0, 1), src.flatten(), ignore_index=PAD_ID)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


@pytest.mark.parametrize("norm_first", [True, False])
def test_both_norm_placements_learn_to_copy(norm_first: bool) -> None:
    # Chance is ln(21) = 3.0 nats. Measured after 300 steps (torch 2.13 CPU, seed 0): pre-norm
    # 0.084, post-norm 0.093. 0.3 leaves a 3x margin and is still a tenth of chance.
    assert train_copy_task(norm_first) < 0.3


@pytest.mark.parametrize("name", ["tiny", "small", "base", "big"])
def test_model_configs_compose_and_build(name: str) -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from attnmt.config import ModelConfig, register_configs
    from conftest import REPO

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name=f"model/{name}")
    model_cfg: ModelConfig = OmegaConf.to_object(cfg.model)
    assert isinstance(model_cfg, ModelConfig)
    assert model_cfg.d_model % model_cfg.n_heads == 0
    model_cfg.src_vocab_size = model_cfg.tgt_vocab_size = 1000
    with torch.device("meta"):  # shapes only: base and big would take seconds to initialise
        model = build_model(model_cfg)
    assert len(model.encoder_layers) == model_cfg.encoder_layers
    assert model.encoder_layers[0].self_attn.d_head == model_cfg.d_model // model_cfg.n_heads


def test_cross_attention_weights_do_not_depend_on_how_the_layer_calls_attention(monkeypatch) -> None:
    from attnmt.model.layers import DecoderLayer

    model = build_model(tiny_config()).eval()
    src, src_mask = padded_batch([5, 3])
    tgt = torch.tensor([[BOS_ID, 5, 6, 7], [BOS_ID, 8, 9, PAD_ID]])
    memory = model.encode(src, src_mask)
    weights = model.cross_attention_weights(tgt, memory, src_mask)  # (L, B, H, T, S)
    assert weights.shape == (2, 2, 2, 4, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 2, 4))
    assert torch.all(weights[:, 1, :, :, 3:] == 0)  # padded source positions get no attention

    def forward_by_keyword(self, x, memory, src_mask, cache=None, layer=0):
        x = self.self_block(x, lambda h: self.self_attn(h, causal=True, cache=cache, layer=layer))
        x = self.cross_block(x, lambda h: self.cross_attn(x=h, memory=memory, key_mask=src_mask, cache=cache, layer=layer))
        return self.ffn_block(x, self.ffn)

    monkeypatch.setattr(DecoderLayer, "forward", forward_by_keyword)
    torch.testing.assert_close(model.cross_attention_weights(tgt, memory, src_mask), weights)


def packed_calls(monkeypatch) -> list[int]:
    """Counts the calls of the packed path (skips where this torch build has no working oneDNN)."""
    from attnmt.model import linear

    if not linear._onednn_works():
        pytest.skip("this torch build has no working oneDNN linear; F.linear is used everywhere")
    calls: list[int] = []
    pointwise = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *args: calls.append(1) or pointwise(*args))
    return calls


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_fused", "adamw_foreach"])
def test_packed_linear_equals_f_linear_and_follows_weight_updates(optimizer: str, monkeypatch) -> None:
    """Inference on the CPU runs on oneDNN-packed weights (attnmt.model.linear): the same function as
    F.linear, training untouched, and a weight changed by training (then eval(), as validation calls
    it), in place on the parameter, or replaced, is repacked."""
    from attnmt.model import linear

    calls = packed_calls(monkeypatch)
    layer = linear.Linear(16, 24)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert calls, "inference did not take the packed path"

    calls.clear()
    out = layer(x)  # autograd on: F.linear, gradients as ever
    assert not calls and out.requires_grad
    out.sum().backward()
    step = {"sgd": lambda p: torch.optim.SGD(p, lr=0.5),
            "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.5, fused=True),  # training's optimizer on the CPU
            "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=0.5, foreach=True)}[optimizer]
    before = layer.weight.detach().clone()
    step(layer.parameters()).step()  # in place (the fused CPU kernel leaves the version counter alone)
    assert not torch.equal(before, layer.weight)
    layer.eval()  # as validation does: drops the pack
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert calls

    with torch.no_grad():
        layer.weight.mul_(2.0)  # in place on the parameter, without eval(): its version counter moved
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        layer.weight = nn.Parameter(torch.randn(24, 16))  # a new tensor (load_state_dict(assign=True), .to())
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
        layer.weight.data.mul_(2.0)  # .data bypasses the version counter: eval() drops the pack
        layer.eval()
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


KERNELS = """
import os, sys
import torch
from attnmt.model import linear
if sys.argv[1] != "torch":
    linear.limit_kernel_cache(int(sys.argv[1]))
torch.set_num_threads(1)

def rss_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024

layer = linear.Linear(256, 256).eval()
x = torch.randn(700, 256)
with torch.inference_mode():
    layer(x[:1])
    start = rss_mb()
    for rows in range(2, 600):  # a shape each: each a kernel compiled
        layer(x[:rows])
print(rss_mb() - start)
"""


def test_a_small_kernel_cache_bounds_the_memory_of_many_shapes(tmp_path) -> None:
    """oneDNN keeps a compiled kernel for each matmul shape (about 0.6 MB on the Xeons we measured):
    ``limit_kernel_cache`` (attnmt-serve's ``kernel_cache``) keeps fewer, so 600 shapes grow the process
    far less than with torch's 1,024. Run in fresh processes: the caches take their size at the first matmul."""
    from attnmt.model import linear

    if not linear._onednn_works():
        pytest.skip("this torch build has no working oneDNN linear")
    if not Path("/proc/self/status").is_file():
        pytest.skip("reads the resident memory in /proc/self/status (Linux)")
    env = {name: value for name, value in os.environ.items() if name not in linear.KERNEL_CACHES}

    def growth(cache: str) -> float:
        done = subprocess.run([sys.executable, "-c", KERNELS, cache], capture_output=True, text=True, env=env,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        return float(done.stdout.split()[-1])

    unbounded = growth("torch")
    if unbounded < 60:
        pytest.skip(f"600 shapes grew this process by {unbounded:.0f} MB only: this CPU's kernels are small")
    bounded = growth("16")
    assert bounded < unbounded / 2, f"16 kernels kept: +{bounded:.0f} MB; torch's 1,024: +{unbounded:.0f} MB"


def test_limit_kernel_cache_sizes_both_caches_and_keeps_what_the_environment_says(monkeypatch) -> None:
    from attnmt.model import linear

    for name in linear.KERNEL_CACHES:
        monkeypatch.delenv(name, raising=False)
    assert linear.limit_kernel_cache(256) == {}
    assert [os.environ[name] for name in linear.KERNEL_CACHES] == ["256", "256"]
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "64")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    assert linear.limit_kernel_cache(128) == {"LRU_CACHE_CAPACITY": "64"}
    assert os.environ["LRU_CACHE_CAPACITY"] == "64" and os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "128"


def test_probing_onednn_leaves_the_random_stream_alone() -> None:
    """The probe runs at a run's first validation; resuming restores the random state saved before
    it, so a probe that drew random numbers would make a resumed run's dropout differ."""
    from attnmt.model import linear

    linear._onednn_works.cache_clear()
    state = torch.get_rng_state()
    linear._onednn_works()
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("tie_output", [True, False])
def test_packed_inference_gives_the_models_logits(tie_output: bool, monkeypatch) -> None:
    """The whole decoder (projections, feed-forward, the output projection) with packed weights gives
    the logits of plain F.linear, cached and full."""
    from attnmt.model import linear

    calls = packed_calls(monkeypatch)
    model = build_model(tiny_config(tie_output=tie_output)).eval()
    src, src_mask = padded_batch([6, 9, 3])
    tgt = torch.cat([torch.full((3, 1), BOS_ID), torch.randint(4, 24, (3, 7))], dim=1)
    with torch.no_grad():
        packed = model.decode(tgt, model.encode(src, src_mask), src_mask)
        cache = model.new_cache()
        memory = model.encode(src, src_mask)
        steps = torch.cat([model.decode(tgt[:, t : t + 1], memory, src_mask, cache) for t in range(tgt.size(1))], 1)
        # every Linear and the output projection (3 per attention, 2 per feed-forward, 1)
        assert len(calls) >= 2 * (2 * 3 + 1 * 3 + 2 * 2 + 1)
        monkeypatch.setattr(linear, "USE_ONEDNN", False)
        plain = model.decode(tgt, model.encode(src, src_mask), src_mask)
    torch.testing.assert_close(packed, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(steps, plain, atol=1e-5, rtol=0)
