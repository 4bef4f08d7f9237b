"""The sampling and logit-processing functions WebLLM's engine calls on every token.

WebLLM's LLMChatPipeline looks these up in the model library by name and refuses a library that
lacks one, even at temperature 0 (greedy runs through them too: the engine sends temperature 1e-6
and top_p 1.0):

  softmax_with_temperature(logits [B, N, V], temperature [B]) -> probs [B, N, V]
  argsort_probs(probs [N, V]) -> (sorted probs, sorted token ids), descending
  sample_with_top_p(sorted_probs, sorted_ids, uniform [B], sample_indices [B], top_p [N]) -> ids [B]
  apply_logit_bias_inplace(logits [B, V], pos2seq_id, token_ids, bias)
  apply_penalty_inplace(logits [B, V], seq_ids, pos2seq_id, token_ids, token_cnt, penalties [S, 3])
  apply_bitmask_inplace(logits [B, V], seq_ids, bitmask [B, ceil(V / 32)])

Each is a Relax function here (the in-place ones return their first argument), over TIR kernels
written for this file. The sort is a bitonic network over the vocabulary padded to a power of two,
one dispatch per stage (TVM 0.27's GPU argsort binds blockIdx.z, which its WebGPU backend refuses).
"""

from __future__ import annotations

import numpy as np
from tvm import relax as rx
from tvm import tirx
from tvm.script import tirx as T

THREADS = 256


def _loops(gpu: bool):
    if gpu:
        return (lambda n: T.thread_binding(n, thread="blockIdx.x")), (lambda n: T.thread_binding(n, thread="threadIdx.x"))
    return T.serial, T.serial


def _top_p_kernel(gpu: bool):
    """One thread per sample: keep the shortest prefix of the sorted distribution whose mass
    reaches top_p (at least one token), then pick the token where the renormalized running sum
    first passes the uniform sample."""
    rows, _ = _loops(gpu)

    @T.prim_func(s_tir=True)
    def sample_top_p(var_probs: T.handle, var_ids: T.handle, var_uniform: T.handle, var_rows: T.handle,
                     var_top_p: T.handle, var_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int32()
        v = T.int32()
        b = T.int32()
        probs = T.match_buffer(var_probs, (n, v), "float32")
        ids = T.match_buffer(var_ids, (n, v), "int32")
        uniform = T.match_buffer(var_uniform, (b,), "float32")
        sample_rows = T.match_buffer(var_rows, (b,), "int32")
        top_p = T.match_buffer(var_top_p, (n,), "float32")
        out = T.match_buffer(var_out, (b,), "int32")
        for s in rows(b):
            with T.sblock("sample"):
                T.reads()
                T.writes()
                acc = T.sblock_alloc_buffer((3,), "float32", scope="local")  # kept mass, running sum, target
                pick = T.sblock_alloc_buffer((2,), "int32", scope="local")  # kept length, chosen position
                r: T.let[T.int32] = sample_rows[s]
                acc[0] = T.float32(0)
                pick[0] = 0
                for j in T.serial(v):
                    if pick[0] == T.cast(j, "int32") and (j == 0 or acc[0] < top_p[r]):
                        acc[0] = acc[0] + probs[r, j]
                        pick[0] = pick[0] + 1
                acc[2] = uniform[s] * acc[0]
                acc[1] = T.float32(0)
                pick[1] = pick[0] - 1
                for j in T.serial(v):
                    if T.cast(j, "int32") < pick[0]:
                        acc[1] = acc[1] + probs[r, j]
                        if acc[1] > acc[2] and T.cast(j, "int32") < pick[1]:
                            pick[1] = T.cast(j, "int32")
                out[s] = ids[r, pick[1]]

    return sample_top_p


def _bitonic_stage_kernel(gpu: bool):
    """One compare-exchange stage of a bitonic sort over (keys, ids) [n, P], into new buffers:
    larger key first, the smaller id first among equal keys. k: the size of the bitonic runs being
    merged, j: the partner distance (both in a 2-element tensor). Each element reads its pair and keeps its own or its
    partner's entry, so no thread writes what another reads."""
    rows, threads = _loops(gpu)
    width = THREADS if gpu else 1

    @T.prim_func(s_tir=True)
    def bitonic_stage(var_keys: T.handle, var_ids: T.handle, var_stage: T.handle, var_keys_out: T.handle,
                      var_ids_out: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        n = T.int32()
        p = T.int32()
        stage = T.match_buffer(var_stage, (2,), "int32")  # k, j
        keys = T.match_buffer(var_keys, (n, p), "float32")
        ids = T.match_buffer(var_ids, (n, p), "int32")
        keys_out = T.match_buffer(var_keys_out, (n, p), "float32")
        ids_out = T.match_buffer(var_ids_out, (n, p), "int32")
        for blk in rows((n * p + width - 1) // width):
            for t in threads(width):
                with T.sblock("stage"):
                    T.reads()
                    T.writes()
                    g: T.let[T.int32] = blk * width + t
                    if g < n * p:
                        r: T.let[T.int32] = g // p
                        i: T.let[T.int32] = g % p
                        partner: T.let[T.int32] = T.bitwise_xor(i, stage[1])
                        lo: T.let[T.int32] = T.min(i, partner)
                        hi: T.let[T.int32] = T.max(i, partner)
                        # the pair (lo, hi) is in descending order already
                        ordered: T.let[T.bool] = keys[r, lo] > keys[r, hi] or (keys[r, lo] == keys[r, hi] and ids[r, lo] < ids[r, hi])
                        desc: T.let[T.bool] = T.bitwise_and(lo, stage[0]) == 0  # this run sorts descending
                        keep: T.let[T.bool] = (ordered and desc) or (not ordered and not desc)
                        keys_out[r, i] = T.if_then_else(keep, keys[r, i], keys[r, partner])
                        ids_out[r, i] = T.if_then_else(keep, ids[r, i], ids[r, partner])

    return bitonic_stage


def attach_argsort(bb: rx.BlockBuilder, gpu: bool, vocab: int):
    """argsort_probs(probs [n, vocab]) -> (probs sorted descending, their token ids)."""
    f32, i32 = "float32", "int32"
    n = tirx.Var("n", "int64")
    size = 1
    while size < vocab:
        size *= 2
    probs = rx.Var("probs", rx.TensorType([n, vocab], f32))
    stage = bb.add_func(_bitonic_stage_kernel(gpu), "bitonic_stage")
    with bb.function("argsort_probs", [probs]):
        # probabilities are >= 0, so -1 pads sort after every real entry
        keys = bb.emit(rx.op.nn.pad(probs, [0, 0, 0, size - vocab], pad_value=-1.0)) if size > vocab else probs
        row = bb.emit(rx.op.reshape(rx.op.arange(0, size, 1, i32), rx.ShapeExpr([1, size])))
        ids = bb.emit(rx.op.broadcast_to(row, rx.ShapeExpr([n, size])))
        ty = [rx.TensorType([n, size], f32), rx.TensorType([n, size], i32)]
        k = 2
        while k <= size:
            j = k // 2
            while j >= 1:
                kj = rx.const(np.array([k, j], dtype="int32"))
                out = bb.emit(rx.call_tir(stage, [keys, ids, kj], ty))
                keys = bb.emit(rx.TupleGetItem(out, 0))
                ids = bb.emit(rx.TupleGetItem(out, 1))
                j //= 2
            k *= 2
        ranked = bb.emit(rx.op.strided_slice(keys, axes=[1], begin=[0], end=[vocab]))
        order = bb.emit(rx.op.strided_slice(ids, axes=[1], begin=[0], end=[vocab]))
        bb.emit_func_output(rx.Tuple([ranked, order]))


def _logit_bias_kernel(gpu: bool):
    rows, _ = _loops(gpu)

    @T.prim_func(s_tir=True)
    def logit_bias(var_logits: T.handle, var_pos2seq: T.handle, var_ids: T.handle, var_bias: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch = T.int32()
        vocab = T.int32()
        num = T.int32()
        logits = T.match_buffer(var_logits, (batch, vocab), "float32")
        pos2seq = T.match_buffer(var_pos2seq, (num,), "int32")
        ids = T.match_buffer(var_ids, (num,), "int32")
        bias = T.match_buffer(var_bias, (num,), "float32")
        for i in rows(num):
            with T.sblock("bias"):
                T.reads()
                T.writes()
                logits[pos2seq[i], ids[i]] = logits[pos2seq[i], ids[i]] + bias[i]

    return logit_bias


def _penalty_kernel(gpu: bool):
    """presence + frequency * count subtracted, then the repetition penalty divides a positive
    logit and multiplies a negative one (the engine's documented order)."""
    rows, _ = _loops(gpu)

    @T.prim_func(s_tir=True)
    def penalty(var_logits: T.handle, var_seq_ids: T.handle, var_pos2seq: T.handle, var_ids: T.handle,
                var_cnt: T.handle, var_pen: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch = T.int32()
        vocab = T.int32()
        num = T.int32()
        nseq = T.int32()
        logits = T.match_buffer(var_logits, (batch, vocab), "float32")
        seq_ids = T.match_buffer(var_seq_ids, (nseq,), "int32")
        pos2seq = T.match_buffer(var_pos2seq, (num,), "int32")
        ids = T.match_buffer(var_ids, (num,), "int32")
        cnt = T.match_buffer(var_cnt, (num,), "int32")
        pen = T.match_buffer(var_pen, (nseq, 3), "float32")
        for i in rows(num):
            with T.sblock("penalty"):
                T.reads()
                T.writes()
                val = T.sblock_alloc_buffer((1,), "float32", scope="local")
                row: T.let[T.int32] = seq_ids[pos2seq[i]]
                val[0] = logits[row, ids[i]] - (pen[pos2seq[i], 0] + T.cast(cnt[i], "float32") * pen[pos2seq[i], 1])
                logits[row, ids[i]] = T.if_then_else(val[0] < T.float32(0), val[0] * pen[pos2seq[i], 2],
                                                     val[0] / pen[pos2seq[i], 2])

    return penalty


def _bitmask_kernel(gpu: bool):
    """Tokens whose bit is 0 in the grammar's bitmask get the lowest float."""
    rows, threads = _loops(gpu)
    width = THREADS if gpu else 1

    @T.prim_func(s_tir=True)
    def bitmask(var_logits: T.handle, var_seq_ids: T.handle, var_mask: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch = T.int32()
        vocab = T.int32()
        nseq = T.int32()
        words = T.int32()
        logits = T.match_buffer(var_logits, (batch, vocab), "float32")
        seq_ids = T.match_buffer(var_seq_ids, (nseq,), "int32")
        mask = T.match_buffer(var_mask, (batch, words), "int32")
        for s in rows(nseq):
            for t in threads(width):
                with T.sblock("mask"):
                    T.reads()
                    T.writes()
                    for i in T.serial((vocab + width - 1) // width):
                        if i * width + t < vocab:
                            tok: T.let[T.int32] = i * width + t
                            if T.bitwise_and(T.shift_right(mask[seq_ids[s], tok // 32], tok % 32), 1) == 0:
                                logits[seq_ids[s], tok] = T.min_value("float32")

    return bitmask


def attach_sampling(bb: rx.BlockBuilder, gpu: bool, vocab: int):
    """Adds the six functions to the module under construction in bb (vocab: the logits' width)."""
    f32, i32 = "float32", "int32"
    b, n, v = (tirx.Var(x, "int64") for x in ("b", "n", "v"))

    logits3 = rx.Var("logits", rx.TensorType([b, n, v], f32))
    temperature = rx.Var("temperature", rx.TensorType([b], f32))
    with bb.function("softmax_with_temperature", [logits3, temperature]):
        t = bb.emit(rx.op.reshape(temperature, rx.ShapeExpr([b, 1, 1])))
        probs = bb.emit(rx.op.nn.softmax(rx.op.divide(logits3, t), axis=-1))
        bb.emit_func_output(probs)

    attach_argsort(bb, gpu, vocab)

    sp = rx.Var("sorted_probs", rx.TensorType([n, v], f32))
    si = rx.Var("sorted_indices", rx.TensorType([n, v], i32))
    bsz = tirx.Var("num_samples", "int64")
    uni = rx.Var("uniform_samples", rx.TensorType([bsz], f32))
    rows = rx.Var("sample_indices", rx.TensorType([bsz], i32))
    top_p = rx.Var("top_p", rx.TensorType([n], f32))
    top_p_fn = bb.add_func(_top_p_kernel(gpu), "sample_top_p_kernel")
    with bb.function("sample_with_top_p", [sp, si, uni, rows, top_p]):
        out = bb.emit(rx.call_tir(top_p_fn, [sp, si, uni, rows, top_p], rx.TensorType([bsz], i32)))
        bb.emit_func_output(out)

    def inplace(name, kernel, params):
        gv = bb.add_func(kernel, name + "_kernel")
        with bb.function(name, params):
            out = bb.emit(rx.call_tir_inplace(gv, params, [0], params[0].ty))
            bb.emit_func_output(out)

    bb2, vv, k, s, w = (tirx.Var(x, "int64") for x in ("batch", "vocab", "num_tokens", "num_seqs", "words"))

    def logits2():
        return rx.Var("logits", rx.TensorType([bb2, vv], f32))

    inplace("apply_logit_bias_inplace", _logit_bias_kernel(gpu),
            [logits2(), rx.Var("pos2seq_id", rx.TensorType([k], i32)), rx.Var("token_ids", rx.TensorType([k], i32)),
             rx.Var("logit_bias", rx.TensorType([k], f32))])
    inplace("apply_penalty_inplace", _penalty_kernel(gpu),
            [logits2(), rx.Var("seq_ids", rx.TensorType([s], i32)), rx.Var("pos2seq_id", rx.TensorType([k], i32)),
             rx.Var("token_ids", rx.TensorType([k], i32)), rx.Var("token_cnt", rx.TensorType([k], i32)),
             rx.Var("penalties", rx.TensorType([s, 3], f32))])
    inplace("apply_bitmask_inplace", _bitmask_kernel(gpu),
            [logits2(), rx.Var("seq_ids", rx.TensorType([s], i32)), rx.Var("bitmask", rx.TensorType([bb2, w], i32))])
