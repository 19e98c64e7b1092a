"""The fast sampler's denoising loop for one canvas (`sampler="fast"`), beside the reference's.

Same schedule and acceptance rule as the reference (temperature t_max -> t_min over the steps, entropy-bound
acceptance of the lowest-entropy positions), with the levers of `FastSamplerConfig`, each on its own switch:
statistics over the top K (`fast_sampler.top_k_statistics`), self-conditioning gathered from the top-K rows,
monotone commit (`freeze`: committed positions are never re-noised or re-decided; with `confirm`, a position is
committed at its second acceptance in a row, when its argmax is the token it was given and, with `commit_entropy`,
it is sure enough; until then, with `resample_pending`, it takes each new sample as the reference's positions do),
only open positions through the decoder (`compact.denoise_positions`), positions after a held end-of-generation id
skipped (`eos_cut`), a step cap with a repair pass, and a repair pass over the whole finished canvas (`repair_all`).
The reference's stop rule still ends a canvas early: once the canvas's argmax is stable and its mean entropy
below the confidence threshold, every open position takes its argmax. Without `freeze` the loop keeps the
reference's rules entirely (every position re-decided each step, re-noised unless accepted, the argmax canvas is
the output), so `top_k`, `gathered_sc` and `argmax_commit` can be measured alone.

Each step is one lazy graph, evaluated once; the one host read per step returns the stop flag and the number of
positions the next step must compute (its shape bucket), plus the draft canvas when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx

from . import backend
from .compact import bucket, denoise_positions, needed_positions, scatter_rows, soft_embedding_rows, take_rows
from .config import SamplerConfig
from .fast_sampler import confirm_commits, top_k_statistics
from .sampler import canvas_statistics, confident, entropy_bound_accept, stable, temperature


@dataclass
class StepWork:
    """Per-row decoder work, accumulated lazily over steps and canvases: passes and positions computed; and
    the number of positions each step ran through the decoder (its shape, a bucket; known on the host)."""

    passes: mx.array
    visits: mx.array
    shapes: list = field(default_factory=list)


def _step_sync(arrays, reads):
    """The one evaluation and the one host read of a denoising step."""
    mx.eval(*arrays, *reads)
    return [a.tolist() for a in reads]


def step_outputs(model, cache, tokens, positions, buffers, soft, temp, uniforms, fast):
    """One step's decoder pass over `positions` and what the sampler reads from it: (entropy, argmax, sample,
    soft embedding) for those positions, and the updated key/value buffers."""
    logits, buffers = denoise_positions(model, take_rows(tokens, positions), positions, cache, buffers,
                                        None if soft is None else take_rows(soft, positions))
    return (*_statistics(model, logits, temp, uniforms, fast), buffers)


def _statistics(model, logits, temp, uniforms, fast):
    """(entropy, argmax, sample, soft embedding) for the computed positions, by the configured levers."""
    cap = model.args.final_logit_softcapping
    soft = None
    if fast.top_k is not None:
        top = top_k_statistics(logits, temp, uniforms, fast.top_k, cap)
        ent, argmax, sample = top.entropy, top.argmax, top.sample
        if fast.gathered_sc:
            soft = soft_embedding_rows(model, top.indices, top.probs)
    if soft is None:
        full = canvas_statistics(logits, temp, uniforms, cap)
        if fast.top_k is None:
            ent, argmax, sample = full.entropy, full.argmax, full.sample
        soft = model.embed_tokens_matmul(full.weights, transpose=False) / full.total[..., None]
        soft = soft * model._embed_scale(soft.dtype)
    return ent, argmax.astype(mx.int32), sample.astype(mx.int32), soft


def fast_canvas(
    model, cache, canvas: mx.array, settings: SamplerConfig, rng, work: StepWork, *,
    finished: mx.array, drafts: bool = False, should_stop: Callable[[], bool] | None = None,
) -> Iterator:
    """Denoise one canvas `[B, C]`; yields (steps so far, draft tokens or None) after every step and returns
    (tokens `[B, C]`, steps). `finished` `[B]` rows (ended in an earlier canvas) are never computed."""
    fast = settings.fast_sampler
    args = model.args
    B, C, V = canvas.shape[0], args.canvas_length, args.vocab_size
    n = settings.max_denoising_steps if fast.step_cap is None else min(fast.step_cap, settings.max_denoising_steps)
    eos = mx.array(settings.eos_token_ids or [-1], dtype=mx.int32)
    fill = settings.pad_token_id
    every = mx.broadcast_to(mx.arange(C, dtype=mx.int32), (B, C))

    def past_eos(frozen, pending, tokens):
        """Positions after an end-of-generation id that is committed, or accepted and awaiting confirmation:
        not computed while it is held (with `eos_cut`); if it is not confirmed they open again."""
        if not (fast.eos_cut and settings.eos_token_ids):
            return mx.zeros((B, C), dtype=mx.bool_)
        held = (frozen | (pending if fast.eos_cut_pending else False)) & (tokens[..., None] == eos).any(axis=-1)
        return every > mx.min(mx.where(held, every, C), axis=1, keepdims=True)

    tokens, argmax = canvas.astype(mx.int32), canvas.astype(mx.int32)
    frozen = mx.broadcast_to(finished[:, None], (B, C))  # committed positions (all of an ended row)
    closed = frozen  # not computed: committed, or after an end-of-generation id held (with `eos_cut`)
    was_cut = mx.zeros((B, C), dtype=mx.bool_)
    fresh = mx.zeros((B, C), dtype=mx.bool_)  # committed last step: computed once more, for their keys/values
    pending = mx.zeros((B, C), dtype=mx.bool_)  # accepted last step, not yet committed (with `confirm`)
    agreed = mx.zeros((B, C), dtype=mx.int32)  # steps in a row a pending position's argmax was its token
    flushed = mx.zeros((B, C), dtype=mx.bool_)  # committed by the step cap (what the repair pass revisits)
    entropies = mx.zeros((B, C), dtype=mx.float32)
    done = finished
    soft, buffers = None, [(None, None)] * len(model.layers)
    history = mx.full((settings.stability_threshold, B, C), -1, dtype=mx.int32) if settings.stability_threshold else None
    size, steps, repairing = C, 0, False
    smallest = backend.current().smallest_bucket

    while True:
        last = steps + 1 == n
        compacting = fast.freeze and fast.compact
        refresh = bool(fast.refresh_every) and steps > 0 and steps % fast.refresh_every == 0
        if not repairing and (steps == 0 or not compacting or refresh):  # every position, in order
            positions, valid = every, mx.broadcast_to(~done[:, None], (B, C))
            buffers = [(None, None)] * len(model.layers)
        else:
            need = flushed if repairing else (~closed | fresh) & ~done[:, None]
            positions, valid = needed_positions(need, size)
        work.passes = work.passes + (~done).astype(mx.int32)
        work.visits = work.visits + valid.sum(axis=1).astype(mx.int32)
        temp = mx.array(temperature(max(n - steps, 1), n, settings.t_min, settings.t_max), dtype=mx.float32)
        ent, new_argmax, sample, new_soft, buffers = step_outputs(model, cache, tokens, positions, buffers, soft, temp,
                                                                  rng.uniforms(positions.shape), fast)
        work.shapes.append(positions.shape[1])
        steps += 1
        if repairing:
            tokens = scatter_rows(tokens, positions, valid, new_argmax)
            argmax = tokens
            done = mx.ones((B,), dtype=mx.bool_)
        elif fast.freeze:
            live = take_rows(~closed, positions) & valid
            accept = entropy_bound_accept(mx.where(live, ent, mx.inf), settings.entropy_bound) & live
            commit = new_argmax if fast.argmax_commit else sample
            commits = accept
            if fast.confirm:  # accepted again, and the argmax is the token it holds: keep that token for good
                given = take_rows(tokens, positions)
                commits, agrees, now_pending, now_agreed = confirm_commits(
                    accept, take_rows(pending, positions), take_rows(agreed, positions), new_argmax, given, ent,
                    fast.confirm_steps, fast.commit_entropy)
                # a commit keeps the token it agreed on; an agreeing position not committed keeps it too, or (with
                # `resample_pending`) takes its new sample, as the reference re-decides every position it accepts
                commit = mx.where(commits if fast.resample_pending else agrees, given, commit)
                pending = scatter_rows(pending, positions, valid & live, now_pending)
                agreed = scatter_rows(agreed, positions, valid & live, now_agreed)
            noise = rng.noise(positions.shape, V)
            tokens = scatter_rows(tokens, positions, valid & live, mx.where(accept, commit, noise))
            frozen = scatter_rows(frozen, positions, valid & live, commits)
            # computed now: no longer owed a pass; without `confirm`, a commit's keys/values have not seen its token
            fresh = scatter_rows(fresh, positions, valid, commits & (fast.compact and not fast.confirm))
            argmax = scatter_rows(argmax, positions, valid & live, new_argmax)
            entropies = scatter_rows(entropies, positions, valid & live, ent)
            # The reference's stop rule over the whole canvas (committed positions count with the entropy they
            # were committed at, positions past a held end-of-generation id as the pad they will be); a row that
            # meets it, or the step cap, commits its open positions' argmax.
            cut = past_eos(frozen, pending, tokens)
            is_stable, history = stable(history, mx.where(frozen | cut, tokens, argmax))
            settle = (is_stable & confident(mx.where(cut, 0.0, entropies), settings.confidence_threshold)) | last
            settling = ~(frozen | cut) & (settle & ~done)[:, None]
            flushed = flushed | (settling if last else False)
            tokens, frozen = mx.where(settling, argmax, tokens), frozen | settling
            cut = past_eos(frozen, pending, tokens)
            fresh = fresh & ~cut
            if fast.eos_pad and fill is not None:  # newly past the held id: pad, and one pass to show it as pad
                newly = cut & ~was_cut
                tokens, fresh = mx.where(newly, fill, tokens), fresh | newly
            closed, was_cut = frozen | cut, cut
            ended = mx.all(closed, axis=1, keepdims=True) & cut  # the row is done: its cut positions are pad
            tokens = mx.where(ended, fill, tokens) if fill is not None else tokens
            frozen = frozen | ended
            argmax = mx.where(closed, tokens, argmax)
            done = done | mx.all(frozen, axis=1)
        else:  # the reference's rules, with the configured statistics
            accept = entropy_bound_accept(ent, settings.entropy_bound)
            commit = new_argmax if fast.argmax_commit else sample
            keep = done[:, None]
            tokens = mx.where(keep, tokens, mx.where(accept, commit, rng.noise((B, C), V)))
            argmax = mx.where(keep, argmax, new_argmax)
            is_stable, history = stable(history, argmax)
            done = done | (is_stable & confident(mx.where(keep, 0.0, ent), settings.confidence_threshold))
            if last:
                done = mx.ones((B,), dtype=mx.bool_)
        soft = scatter_rows(soft if soft is not None else mx.zeros((*tokens.shape, new_soft.shape[-1]), new_soft.dtype),
                            positions, valid, new_soft)
        all_done = mx.all(done)
        count = ((flushed if fast.repair and last else (~closed | fresh) & ~done[:, None]).sum(axis=1).max()
                 if compacting else mx.array(C))
        if fast.repair_all and fast.freeze and not repairing:  # the canvas is done: what the repair pass computes
            final = ~past_eos(frozen, pending, tokens) & ~finished[:, None]
            flushed = mx.where(all_done, final, flushed)
            count = mx.where(all_done, final.sum(axis=1).max(), count)
        state = [tokens, argmax, frozen, closed, fresh, pending, agreed, flushed, entropies, soft, done, was_cut,
                 work.passes, work.visits,
                 *[a for kv in buffers for a in kv if a is not None], *([history] if history is not None else [])]
        host = _step_sync(state, [all_done, count, *([argmax] if drafts else [])])
        yield steps, (host[2] if drafts else None)
        stop = should_stop is not None and should_stop()
        if repairing or stop:
            break
        if host[0]:
            if (fast.repair and last or fast.repair_all) and fast.freeze and host[1] > 0:
                repairing, size = True, bucket(host[1], C, smallest)
                done = finished | ~mx.any(flushed, axis=1)  # only rows the cap flushed run the repair pass
                continue
            break
        size = bucket(max(host[1], 1), C, smallest) if compacting else C
    return argmax, steps
