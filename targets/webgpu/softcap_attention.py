"""Attention kernels for the TVM runtime's paged KV cache, with Gemma 2's soft-cap and local windows.

The runtime (`vm.builtin.paged_attention_kv_cache_create`, linked into every model library) owns the
pages and calls three attention kernels with fixed signatures:

  ragged prefill  new queries against the new keys of the same forward pass (causal)
  paged prefill   new queries against the keys already in the pages
  paged decode    one query per sequence against the pages (its own key already appended)

and merges the partial results through their base-2 log-sum-exp. TVM's own kernels have no
soft-cap, and the runtime hands every layer the same kernel, so these kernels carry the two
things a Gemma 2 layer needs that the signature does not:

  soft-cap   baked in when the kernel is built: scores become cap * tanh(scores / cap)
  window     baked in as a size; a layer asks for it by passing a negative sm_scale (the runtime
             forwards sm_scale to the kernels untouched), so local layers mask keys whose position
             is `window` or more behind the query, by absolute position, and global layers do not

The same function is built for the GPU (one thread per query row and head) and for the host CPU
(serial loops), so the numerics can be checked without a browser.
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

LOG2E = math.log2(math.e)
NEG = -5e4  # the score of "no key": exp2(NEG - m) is 0 for any real score m
PAGE_SIZE = 16  # the page size WebLLM asks for, and the one TVM's page kernels are built with
TANH_CLIP = 15.0  # tanh(15) rounds to 1.0 in f32; clipping keeps WGSL's tanh away from overflow


def _outer(gpu: bool):
    """Loop kinds for (row, head): block/thread bindings on the GPU, serial loops on the CPU."""
    if gpu:
        return (lambda n: T.thread_binding(n, thread="blockIdx.x")), (lambda n: T.thread_binding(n, thread="threadIdx.x"))
    return T.serial, T.serial


def _score(raw, scale, softcap):
    """Scaled (and soft-capped) score in base-2 units, as a TIR expression."""
    s = raw * scale
    if softcap is not None:
        x = T.min(T.max(s / T.float32(softcap), T.float32(-TANH_CLIP)), T.float32(TANH_CLIP))
        s = T.tanh(x) * T.float32(softcap)
    return s * T.float32(LOG2E)


def ragged_prefill(h_kv: int, h_q: int, d: int, dtype: str, softcap: float | None, window: int | None, gpu: bool):
    """Signature of TVM's ragged prefill kernel: q, q_indptr, k, v, kv_indptr, q_rope_position,
    k_rope_pos_offset, output, lse, causal, rotary_mode, rope_scale, rope_theta, sm_scale."""
    group = h_q // h_kv
    rows, heads = _outer(gpu)
    win = window if window is not None else 0

    @T.prim_func(s_tir=True)
    def attention_ragged(var_q: T.handle, var_q_indptr: T.handle, var_k: T.handle, var_v: T.handle,
                         var_kv_indptr: T.handle, var_q_rope_position: T.handle, var_k_rope_pos_offset: T.handle,
                         var_output: T.handle, var_lse: T.handle, causal: T.int32, rotary_mode: T.int32,
                         rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_off = T.int32()
        kv_indptr_off = T.int32()
        q_pos_off = T.int32()
        k_pos_off = T.int32()
        q = T.match_buffer(var_q, (qo_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_off)
        k = T.match_buffer(var_k, (kv_len, h_kv, d), dtype)
        v = T.match_buffer(var_v, (kv_len, h_kv, d), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_off)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_pos_off)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_pos_off)
        output = T.match_buffer(var_output, (qo_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (qo_len, h_q), "float32")

        for row in rows(qo_len):
            for h in heads(h_q):
                with T.sblock("attn"):
                    T.reads()
                    T.writes()
                    acc = T.sblock_alloc_buffer((d,), "float32", scope="local")
                    st = T.sblock_alloc_buffer((4,), "float32", scope="local")  # m, denominator, score, rescale
                    seq = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    seq[0] = 0
                    for b in T.serial(batch_size):
                        if q_indptr[b + 1] <= row:
                            seq[0] = b + 1
                    st[0] = T.float32(NEG)
                    st[1] = T.float32(0)
                    for c in T.serial(d):
                        acc[c] = T.float32(0)
                    kv_begin: T.let[T.int32] = kv_indptr[seq[0]]
                    q_pos: T.let[T.int32] = q_rope_position[row]
                    for j in T.serial(kv_indptr[seq[0] + 1] - kv_begin):
                        k_pos: T.let[T.int32] = k_rope_pos_offset[seq[0]] + j
                        if (causal == 0 or k_pos <= q_pos) and (sm_scale > T.float32(0) or q_pos - k_pos < win):
                            st[2] = T.float32(0)
                            for c in T.serial(d):
                                st[2] = st[2] + T.cast(q[row, h, c], "float32") * T.cast(k[kv_begin + j, h // group, c], "float32")
                            st[2] = _score(st[2], T.abs(sm_scale), softcap)
                            st[3] = T.exp2(st[0] - T.max(st[0], st[2]))
                            st[0] = T.max(st[0], st[2])
                            st[2] = T.exp2(st[2] - st[0])
                            st[1] = st[1] * st[3] + st[2]
                            for c in T.serial(d):
                                acc[c] = acc[c] * st[3] + st[2] * T.cast(v[kv_begin + j, h // group, c], "float32")
                    for c in T.serial(d):
                        output[row, h, c] = T.cast(T.if_then_else(st[1] > T.float32(0), acc[c] / st[1], T.float32(0)), dtype)
                    lse[row, h] = T.if_then_else(st[1] > T.float32(0), st[0] + T.log2(st[1]), T.float32(NEG))

    return attention_ragged


def paged_prefill(h_kv: int, h_q: int, d: int, dtype: str, softcap: float | None, window: int | None, gpu: bool):
    """Signature of TVM's paged prefill kernel: q, q_indptr, pages, page_indptr, page_values,
    length_info (last page length per sequence), k_rope_pos_offset, q_rope_position, output, lse,
    causal, rotary_mode, rope_scale, rope_theta, sm_scale."""
    group = h_q // h_kv
    rows, heads = _outer(gpu)
    win = window if window is not None else 0
    page = PAGE_SIZE

    @T.prim_func(s_tir=True)
    def attention_paged_prefill(var_q: T.handle, var_q_indptr: T.handle, var_pages: T.handle,
                                var_page_indptr: T.handle, var_page_values: T.handle, var_length_info: T.handle,
                                var_k_rope_pos_offset: T.handle, var_q_rope_position: T.handle,
                                var_output: T.handle, var_lse: T.handle, causal: T.int32, rotary_mode: T.int32,
                                rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        batch_size = T.int32()
        total_len = T.int32()
        max_num_pages = T.int32()
        nnz_pages = T.int32()
        q_indptr_off = T.int32()
        pages_off = T.int64()
        page_indptr_off = T.int32()
        page_values_off = T.int32()
        length_info_off = T.int32()
        k_pos_off = T.int32()
        q_pos_off = T.int32()
        q = T.match_buffer(var_q, (total_len, h_q, d), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_off)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page, d), dtype, elem_offset=pages_off)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_off)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_off)
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_off)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_pos_off)
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_pos_off)
        output = T.match_buffer(var_output, (total_len, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (total_len, h_q), "float32")

        for row in rows(total_len):
            for h in heads(h_q):
                with T.sblock("attn"):
                    T.reads()
                    T.writes()
                    acc = T.sblock_alloc_buffer((d,), "float32", scope="local")
                    st = T.sblock_alloc_buffer((4,), "float32", scope="local")
                    seq = T.sblock_alloc_buffer((1,), "int32", scope="local")
                    seq[0] = 0
                    for b in T.serial(batch_size):
                        if q_indptr[b + 1] <= row:
                            seq[0] = b + 1
                    st[0] = T.float32(NEG)
                    st[1] = T.float32(0)
                    for c in T.serial(d):
                        acc[c] = T.float32(0)
                    p_begin: T.let[T.int32] = page_indptr[seq[0]]
                    n_pages: T.let[T.int32] = page_indptr[seq[0] + 1] - p_begin
                    kv_len: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * page + length_info[seq[0]], 0)
                    q_pos: T.let[T.int32] = q_rope_position[row]
                    # with causal set, the chunk's last query sees every key; earlier ones fewer
                    last_key: T.let[T.int32] = kv_len - (q_indptr[seq[0] + 1] - row)
                    for j in T.serial(kv_len):
                        k_pos: T.let[T.int32] = k_rope_pos_offset[seq[0]] + j
                        if (causal == 0 or j <= last_key) and (sm_scale > T.float32(0) or q_pos - k_pos < win):
                            pg: T.let[T.int32] = page_values[p_begin + j // page]
                            st[2] = T.float32(0)
                            for c in T.serial(d):
                                st[2] = st[2] + T.cast(q[row, h, c], "float32") * T.cast(pages[pg, 0, h // group, j % page, c], "float32")
                            st[2] = _score(st[2], T.abs(sm_scale), softcap)
                            st[3] = T.exp2(st[0] - T.max(st[0], st[2]))
                            st[0] = T.max(st[0], st[2])
                            st[2] = T.exp2(st[2] - st[0])
                            st[1] = st[1] * st[3] + st[2]
                            for c in T.serial(d):
                                acc[c] = acc[c] * st[3] + st[2] * T.cast(pages[pg, 1, h // group, j % page, c], "float32")
                    for c in T.serial(d):
                        output[row, h, c] = T.cast(T.if_then_else(st[1] > T.float32(0), acc[c] / st[1], T.float32(0)), dtype)
                    lse[row, h] = T.if_then_else(st[1] > T.float32(0), st[0] + T.log2(st[1]), T.float32(NEG))

    return attention_paged_prefill


def paged_decode(h_kv: int, h_q: int, d: int, dtype: str, softcap: float | None, window: int | None, gpu: bool):
    """Signature of TVM's paged decode kernel: q [B, h_q, d], pages, page_indptr, page_values,
    length_info, k_rope_pos_offset, q_rope_position [B], output, lse, rotary_mode, rope_scale,
    rope_theta, sm_scale. The query's own key is already in the pages."""
    group = h_q // h_kv
    rows, heads = _outer(gpu)
    win = window if window is not None else 0
    page = PAGE_SIZE

    @T.prim_func(s_tir=True)
    def attention_decode(var_q: T.handle, var_pages: T.handle, var_page_indptr: T.handle,
                         var_page_values: T.handle, var_length_info: T.handle, var_k_rope_pos_offset: T.handle,
                         var_q_rope_position: T.handle, var_output: T.handle, var_lse: T.handle,
                         rotary_mode: T.int32, rope_scale: T.float32, rope_theta: T.float32, sm_scale: T.float32):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int32()
        max_num_pages = T.int32()
        nnz_pages = T.int32()
        pages_off = T.int64()
        page_indptr_off = T.int32()
        page_values_off = T.int32()
        length_info_off = T.int32()
        k_pos_off = T.int32()
        q_pos_off = T.int32()
        q = T.match_buffer(var_q, (B, h_q, d), dtype)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, h_kv, page, d), dtype, elem_offset=pages_off)
        page_indptr = T.match_buffer(var_page_indptr, (B + 1,), "int32", elem_offset=page_indptr_off)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_off)
        length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_info_off)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (B,), "int32", elem_offset=k_pos_off)
        q_rope_position = T.match_buffer(var_q_rope_position, (B,), "int32", elem_offset=q_pos_off)
        output = T.match_buffer(var_output, (B, h_q, d), dtype)
        lse = T.match_buffer(var_lse, (B, h_q), "float32")

        for row in rows(B):
            for h in heads(h_q):
                with T.sblock("attn"):
                    T.reads()
                    T.writes()
                    acc = T.sblock_alloc_buffer((d,), "float32", scope="local")
                    st = T.sblock_alloc_buffer((4,), "float32", scope="local")
                    st[0] = T.float32(NEG)
                    st[1] = T.float32(0)
                    for c in T.serial(d):
                        acc[c] = T.float32(0)
                    p_begin: T.let[T.int32] = page_indptr[row]
                    n_pages: T.let[T.int32] = page_indptr[row + 1] - p_begin
                    kv_len: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * page + length_info[row], 0)
                    q_pos: T.let[T.int32] = q_rope_position[row]
                    for j in T.serial(kv_len):
                        k_pos: T.let[T.int32] = k_rope_pos_offset[row] + j
                        if sm_scale > T.float32(0) or q_pos - k_pos < win:
                            pg: T.let[T.int32] = page_values[p_begin + j // page]
                            st[2] = T.float32(0)
                            for c in T.serial(d):
                                st[2] = st[2] + T.cast(q[row, h, c], "float32") * T.cast(pages[pg, 0, h // group, j % page, c], "float32")
                            st[2] = _score(st[2], T.abs(sm_scale), softcap)
                            st[3] = T.exp2(st[0] - T.max(st[0], st[2]))
                            st[0] = T.max(st[0], st[2])
                            st[2] = T.exp2(st[2] - st[0])
                            st[1] = st[1] * st[3] + st[2]
                            for c in T.serial(d):
                                acc[c] = acc[c] * st[3] + st[2] * T.cast(pages[pg, 1, h // group, j % page, c], "float32")
                    for c in T.serial(d):
                        output[row, h, c] = T.cast(T.if_then_else(st[1] > T.float32(0), acc[c] / st[1], T.float32(0)), dtype)
                    lse[row, h] = T.if_then_else(st[1] > T.float32(0), st[0] + T.log2(st[1]), T.float32(NEG))

    return attention_decode
