"""Re-synchronization against the reference: neurons put back in order, sign and scale, with
split neurons merged and dummy neurons dropped ("Find the Lady", extended to the invariant
neuron transforms of :mod:`watermark.obfuscate`).

De Sousa Trias et al., "Find the Lady: Permutation and Re-Synchronization of Deep Neural
Networks", arXiv 2312.14182, re-synchronize a permuted network against the owner's reference;
Yan et al. (KDD 2023) show that sign flips, scaling and dummy / split neurons defeat matching by
permutation alone.  The owner holds the reference network; the suspect may have been obfuscated
(permuted, scaled, sign-flipped, split, padded) and then pruned, fine-tuned or re-quantized.
Layer by layer from the input side:

1. layer ``l``'s inputs are in the reference order, sign and scale (the network's input is never
   touched; the previous layer has just been restored), so its fan-in is the reference's;
2. every suspect neuron is described by its incoming weights (a row), every reference neuron
   likewise; the similarity is ``|cos|`` of the rows: blind to a per-neuron scale (and so to the
   per-layer scale of a quantized suspect) and to its sign;
3. suspect neurons that compute nothing are set aside: ``|incoming| |outgoing|`` (blind to the
   neuron's scale) below :data:`DEAD` times the layer's median (dummy neurons before any training,
   neurons pruned away);
4. the one-to-one assignment of ``n_ref`` of the other suspect neurons to the reference neurons
   with the largest total similarity (Hungarian algorithm,
   :func:`scipy.optimize.linear_sum_assignment`, rectangular when the suspect has more neurons)
   picks each reference neuron's *representative*; every other live suspect neuron is a split copy
   of a representative if it is credible (:func:`_credible`): its ``|cos|``, taken on the copy's
   nonzero weights (a pruned copy is proportional to its twin on the weights it kept) against the
   representative or against the reference neuron, whichever is higher, is at least ``merge`` and
   more than a random row of as many weights reaches by chance (probability :data:`CHANCE`: a copy
   pruned to three weights must match almost exactly); or, when it kept too few incoming weights
   to tell (one weight is proportional to anything), they agree (``|cos| >= merge``) and its
   outgoing weights explain beyond chance what the representative's leave unexplained of the
   reference neuron's (a split's copies add up to them, ``a1 v1 + a2 v2 = v``, though neither
   resembles them alone).  Else it is a dummy, dropped.  Once the outgoing weights are known
   (second pass), each reference neuron's group (representative and copies) is pruned, weakest
   first, of the members for which neither test holds against the others: a dummy that the
   assignment had to give to a reference neuron whose descendants were all pruned away goes;
5. the representative's sign ``sigma`` is that of its cosine with the reference neuron and its
   scale is restored to the reference's, ``kappa_j = sigma_j (|R_j| / |S_rep|) / g`` (``g`` the
   layer's median ratio, so that the restored layer keeps the suspect's units); a copy ``k`` of
   it has ``rho_k = <S_k, S_rep> / |S_rep|^2`` over the weights both kept;
6. the restored neuron ``j`` has incoming weights and bias ``kappa_j`` times the least-squares
   estimate of the representative's from all its copies, ``sum_k rho_k S_k / sum_k rho_k^2`` (a
   weight pruned in one copy is read in another; for an exact split, the representative's);
   the next dot layer reads it through ``(1 / kappa_j) sum_k rho_k v_k`` (the outgoing weights of
   its copies merged); a GDN between gets ``gamma~_jj' = sum_{k in G_j'} gamma_{rep_j, k} |rho_k| /
   |kappa_j'|`` and ``beta~_j = beta_{rep_j}``, the latent's per-channel tables follow the
   representative.  For an exact obfuscation through ReLU or GDN1 the restored network computes
   the suspect's function.

Matching needs no data and works on the deployed integers.  (Which neuron descriptor Find the
Lady matches on we could not check against its text: the stored copy available here gave the
abstract and introduction only; the steps above are ours.)  :func:`fraction_restored` is Psi,
the share of the suspect's neurons whose origin (reference neuron, or "dummy") was recovered.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment

from licforge.quant.bundle import Layer
from .layers import OUT_AXIS, channel_path, copy_chain, input_slices, map_inputs, rows
from .permute import permutable_layers

__all__ = ["resynchronize", "fraction_restored", "live_origins", "MERGE", "DEAD"]

MERGE = 0.6
"""Default floor of the ``|cos|`` above which an unassigned suspect neuron is merged as a split copy."""
CHANCE = 0.01
"""Chance, for a random row, of passing the merge test against any representative."""
DEAD = 0.02
"""A suspect neuron whose ``|incoming| |outgoing|`` is below this share of the layer's median is dead."""
KAPPA_MAX = 64.0
"""Bound on a restored neuron's scale relative to its layer's (an attacker's scales are within a
few times; a row that quantization or pruning nearly emptied must not blow up the next layer)."""
AGREE = 0.9
"""``|cos|`` of a suspect neuron's incoming weights with a candidate's above which they agree well
enough for its outgoing weights to decide (a split copy's are proportional to its twin's; a dummy
that fine-tuning made useful agrees by chance at 0.6 on eight weights)."""
EXPLAINED = 0.3
"""Outgoing weights of a reference neuron whose part left unexplained by a group's other members
is below this share of their norm (91 % of the energy explained) give no evidence for another
member: what is left is the noise of quantization and training."""
PASSES = 2
"""Matching passes: the second also compares outgoing weights, through the next layer as the first put it back."""


def _unit(r: np.ndarray) -> np.ndarray:
    return r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-300)


def _restricted_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|cos| of every row of ``a`` with every row of ``b``, each pair on the support of the ``a``
    row (a pruned split copy is proportional to its twin on the weights it kept)."""
    mask = (a != 0).astype(np.float64)
    num = np.abs(a @ b.T)
    den = np.linalg.norm(a, axis=1)[:, None] * np.sqrt(mask @ (b * b).T)
    return num / np.maximum(den, 1e-300)


def _alive(s: np.ndarray, v_norm: np.ndarray) -> np.ndarray:
    """Suspect neurons that compute something: ``|incoming| |outgoing|`` (invariant to the neuron's
    scale) at least :data:`DEAD` times the layer's median."""
    contrib = np.linalg.norm(s, axis=1) * v_norm
    pos = contrib[contrib > 0]
    return contrib > DEAD * (float(np.median(pos)) if len(pos) else 0.0)


def _credible(in_cos: np.ndarray, k_in: np.ndarray, out_cos: np.ndarray | None, k_out: np.ndarray,
              candidates: int, merge: float, agree: float | np.ndarray = AGREE) -> np.ndarray:
    """Whether a suspect neuron descends from a candidate: its incoming weights are similar beyond
    chance (``|cos| >= max(merge, chance)`` on the ``k_in`` weights it kept), or, when they are
    too few to tell (a copy pruned to one weight is proportional to anything), they agree
    (``|cos| >= agree``, :data:`AGREE` for a copy, ``merge`` for the representative the assignment
    chose) and ``out_cos``, the share of the candidate's outgoing weights that its
    outgoing weights explain (:func:`_residual_cos`), is beyond chance on the ``k_out`` it kept.
    Arrays broadcast (suspect rows x candidates)."""
    ok = in_cos >= np.maximum(merge, _chance_cos(k_in, candidates))
    if out_cos is None:
        return ok
    return ok | ((in_cos >= np.maximum(merge, agree)) & (out_cos >= _chance_cos(k_out, candidates)))


def _assign(s: np.ndarray, r: np.ndarray, v_norm: np.ndarray, merge: float,
            out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Origin of every suspect row (reference index or -1) and each reference row's representative
    (suspect index or -1), steps 2-4 of the module docstring.  ``out = (v, u)``, when known: the
    outgoing weights of every suspect neuron (the next layer's, put in the reference's order) and
    of every reference neuron, one row each; the assignment then averages the two similarities,
    each weighted by the number of nonzero weights it rests on, a copy may be told by its outgoing
    weights (:func:`_credible`), and every group is pruned (:func:`_prune_group`)."""
    origin = np.full(len(s), -1)
    rep = np.full(len(r), -1)
    idx = np.flatnonzero(_alive(s, v_norm))
    if not len(idx):
        return origin, rep
    k_in = np.count_nonzero(s, axis=1)[:, None]
    sim = np.abs(_unit(s[idx]) @ _unit(r).T)
    v, u = out if out is not None else (None, None)
    k_out = np.count_nonzero(v, axis=1)[:, None] if v is not None else np.zeros_like(k_in)
    if v is not None:
        sim = (k_in[idx] * sim + k_out[idx] * np.abs(_unit(v[idx]) @ _unit(u).T)) / np.maximum(k_in[idx] + k_out[idx], 1)
    picked, refs = linear_sum_assignment(-sim)
    picked = idx[picked]
    origin[picked] = refs
    rep[refs] = picked
    left = np.setdiff1d(idx, picked)
    if len(left) and len(picked):
        in_twin = np.maximum(_restricted_cos(s[left], s[picked]), _restricted_cos(s[left], r[refs]))
        out_twin = None if v is None else _split_gain(v[left], v[picked], u[refs])
        strong = _credible(in_twin, k_in[left], None, k_out[left], len(picked), merge)
        ok = _credible(in_twin, k_in[left], out_twin, k_out[left], len(picked), merge)
        score = np.where(strong, 2 + in_twin, np.where(ok, in_twin if out_twin is None else out_twin, -1.0))
        best = score.argmax(1)
        hit = ok[np.arange(len(left)), best]
        origin[left[hit]] = refs[best[hit]]
    if v is not None:
        for j in np.flatnonzero(rep >= 0):
            _prune_group(origin, rep, j, s, r, v, u, merge)
    return origin, rep


def _prune_group(origin: np.ndarray, rep: np.ndarray, j: int, s: np.ndarray, r: np.ndarray, v: np.ndarray,
                 u: np.ndarray, merge: float) -> None:
    """Drop (in place, origin -1) the members of reference neuron ``j``'s group that nothing says
    descend from it, one at a time, the weakest first: a member stays if its incoming weights match
    ``r_j`` beyond chance, or if they agree with it and its outgoing weights explain beyond chance
    what the other members' leave unexplained of ``u_j`` (a split's copies add up to the reference's
    outgoing weights).  A dummy that the assignment had to give to a reference neuron whose
    descendants were all pruned away, or that a split copy's weak evidence let in, goes; the
    representative is then the remaining member most similar to ``r_j``."""
    members = list(np.flatnonzero(origin == j))
    while members:
        idx = np.asarray(members)
        in_cos = _restricted_cos(s[idx], r[j:j + 1])[:, 0]
        gain = np.array([_residual_cos(v[m], v[np.setdiff1d(idx, [m])], u[j]) for m in idx])
        ok = _credible(in_cos, np.count_nonzero(s[idx], axis=1), gain, np.count_nonzero(v[idx], axis=1), len(r), merge,
                       np.where(idx == rep[j], merge, AGREE))
        if ok.all():
            break
        weakest = idx[~ok][np.argmin(gain[~ok])]
        origin[weakest] = -1
        members.remove(weakest)
    if not members:
        rep[j] = -1
    elif rep[j] not in members:
        idx = np.asarray(members)
        rep[j] = idx[np.argmax(np.abs(_unit(s[idx]) @ _unit(r[j:j + 1]).T)[:, 0])]


def _residual_cos(c: np.ndarray, others: np.ndarray, u: np.ndarray) -> float:
    """``|cos|`` between the parts of ``c`` and ``u`` orthogonal to the rows of ``others`` (for no
    others, ``|cos(c, u)|``): how much of what ``others`` leave unexplained of ``u`` ``c`` explains;
    0 when they leave less than :data:`EXPLAINED` of ``u``'s norm.  For a random ``c`` it is
    distributed like ``|cos|`` with a fixed direction."""
    size = np.linalg.norm(u)
    if len(others):
        q, _ = np.linalg.qr(others.T)
        c, u = c - q @ (q.T @ c), u - q @ (q.T @ u)
    den = np.linalg.norm(c) * np.linalg.norm(u)
    return float(abs(c @ u) / den) if den > 0 and np.linalg.norm(u) >= EXPLAINED * size else 0.0


def _split_gain(c: np.ndarray, p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """:func:`_residual_cos` of every candidate copy ``c_i`` (a row) given representative ``p_j``,
    with the reference's outgoing weights ``u_j`` (rows of ``p`` and ``u`` paired): a split's
    copies add up to the reference neuron's outgoing weights (``a1 v1 + a2 v2 = v``) though
    neither resembles them alone."""
    return np.array([[_residual_cos(ci, pj[None], uj) for pj, uj in zip(p, u)] for ci in c]).reshape(len(c), len(p))


def _chance_cos(k: np.ndarray, candidates: int) -> np.ndarray:
    """The ``|cos|`` a random direction in ``k`` dimensions exceeds against one of ``candidates``
    fixed ones with probability :data:`CHANCE` (``cos^2 ~ Beta(1/2, (k-1)/2)``, union bound); above
    1 (never reached) for ``k <= 1``: one weight is proportional to anything."""
    from scipy.special import betaincinv

    k = np.asarray(k, np.float64)
    t = np.sqrt(betaincinv(0.5, (np.maximum(k, 2.0) - 1) / 2, 1 - CHANCE / max(candidates, 1)))
    return np.where(k <= 1, 2.0, t)


def _restore_layer(work: list[Layer], i: int, r: np.ndarray, origin: np.ndarray, rep: np.ndarray) -> np.ndarray:
    """Step 5-6 on ``work[i]`` in place: the suspect's neurons replaced by the reference's count,
    each restored from its representative and merged copies; returns the factors ``kappa``."""
    lay = work[i]
    axis = OUT_AXIS[lay.op]
    between, nxt = channel_path(work, i)
    s = rows(np.asarray(lay.tensors["weight"], np.float64), lay.op)
    n_s, n_r = len(s), len(r)
    sq = np.einsum("ij,ij->i", s, s)
    rho = np.zeros(n_s)
    for k in range(n_s):
        if origin[k] >= 0:
            t = rep[origin[k]]
            rho[k] = 1.0 if k == t else float(s[k] @ s[t]) / max(float(np.sum(s[t][s[k] != 0] ** 2)), 1e-300)
    have = rep >= 0
    have[have] = sq[rep[have]] > 0  # a representative with no weights left restores nothing
    ratio = np.ones(n_r)
    ratio[have] = np.linalg.norm(r[have], axis=1) / np.sqrt(sq[rep[have]])
    g = float(np.median(ratio[have])) if have.any() else 1.0
    sign = np.ones(n_r)
    sign[have] = np.where(np.einsum("ij,ij->i", s[rep[have]], r[have]) < 0, -1.0, 1.0)
    kappa = np.where(have, sign * np.clip(ratio / g, 1 / KAPPA_MAX, KAPPA_MAX), 1.0)
    safe = np.where(have, rep, 0)

    # merging matrix: restored channel j = sum_k M[j, k] (suspect channel k), M[j, k] = rho_k / kappa_j
    members = np.zeros((n_r, n_s))
    for k in range(n_s):
        if origin[k] >= 0:
            members[origin[k], k] = rho[k]
    # incoming weights: the least-squares estimate of the representative's row from its copies
    # (copy k = rho_k x representative), so that a weight pruned in one copy is read in another
    ls = np.where(have, 1.0, 0.0) / np.maximum((members ** 2).sum(1), 1e-300)
    w = np.moveaxis(np.asarray(lay.tensors["weight"], np.float64), axis, 0)
    new_w = np.tensordot(members * (ls * kappa)[:, None], w, axes=(1, 0))
    lay.tensors["weight"] = np.moveaxis(new_w, 0, axis)
    if "bias" in lay.tensors:
        lay.tensors["bias"] = members @ np.asarray(lay.tensors["bias"], np.float64) * ls * kappa
    for j in between:
        node = work[j]
        if node.op in ("gdn", "igdn"):
            gam = np.asarray(node.tensors["gamma"], np.float64)
            node.tensors["gamma"] = (gam[safe] @ np.abs(members).T) / np.abs(kappa)[None, :] * have[:, None]
            node.tensors["beta"] = np.asarray(node.tensors["beta"], np.float64)[safe]
        elif node.op == "latent":
            node.tensors = {k: v[safe] for k, v in node.tensors.items()}
    v = input_slices(work[nxt], n_s).astype(np.float64)
    merged = np.tensordot(members / kappa[:, None], v, axes=(1, 0))
    merged[np.abs(merged) <= 1e-9 * max(float(np.abs(merged).max(initial=0.0)), 1e-300)] = 0.0  # exact cancellations
    map_inputs(work[nxt], n_s, lambda _: merged)
    return kappa


def _outgoing(work: list[Layer], i: int, reference: list[Layer], n_s: int, n_r: int,
              consumer_state: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """The outgoing weights (the next dot layer's weights that read the neuron) of every suspect
    neuron and of every reference neuron, one flattened row each, the next layer's rows put in the
    reference's order, sign and scale by ``consumer_state = (representatives, kappa)`` of that
    layer (from a previous pass; the identity for the network's last layer, whose outputs never
    move); None when unknown."""
    _, nxt = channel_path(work, i)
    cname = work[nxt].name
    last = cname not in permutable_layers(work)
    if not last and consumer_state is None:
        return None
    v = input_slices(work[nxt], n_s).astype(np.float64)  # (n_s, consumer outputs, ...)
    ref_c = next(l for l in reference if l.name == cname)
    u = input_slices(ref_c, n_r).astype(np.float64)
    if not last:
        rep, kappa = consumer_state
        v = v[:, np.where(rep >= 0, rep, 0)] * (kappa * (rep >= 0)).reshape((1, -1) + (1,) * (v.ndim - 2))
    if v.shape[1:] != u.shape[1:]:
        return None
    return v.reshape(n_s, -1), u.reshape(n_r, -1)


def _known(s: np.ndarray, r: np.ndarray, origin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Representatives for given origins: per reference neuron, its descendant most similar to it."""
    sim = np.abs(_unit(s) @ _unit(r).T)
    rep = np.full(len(r), -1)
    for j in range(len(r)):
        kids = np.flatnonzero(origin == j)
        if len(kids):
            rep[j] = kids[np.argmax(sim[kids, j])]
    return np.asarray(origin), rep


def resynchronize(reference: list[Layer], suspect: list[Layer], *, merge: float = MERGE,
                  known: Mapping[str, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], list[Layer]]:
    """Put ``suspect`` back into ``reference``'s neurons (module docstring).  Returns, per
    permutable layer, the estimated origin of each suspect neuron (the reference neuron it was
    matched or merged to, ``-1`` for a dropped dummy: for a pure permutation ``perms`` of
    :func:`watermark.permute.permute`, exactly ``perms``), and the restored chain, with the
    reference's layer shapes (float tensors).  ``known``: the true origins (of an obfuscation
    whose ground truth is known) used instead of estimated ones, to separate what the matching
    gets wrong from what an attack destroyed."""
    ref = {l.name: l for l in reference if l.op in OUT_AXIS}
    state: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for _ in range(PASSES if known is None else 1):
        work = copy_chain(suspect)
        est: dict[str, np.ndarray] = {}
        done: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name in permutable_layers(work):
            if name not in ref:
                raise ValueError(f"the reference has no layer {name!r}; re-synchronize against the network "
                                 f"the key was made for")
            i = next(k for k, l in enumerate(work) if l.name == name)
            lay = work[i]
            r = rows(np.asarray(ref[name].tensors["weight"], np.float64), ref[name].op)
            s = rows(np.asarray(lay.tensors["weight"], np.float64), lay.op)
            if ref[name].op != lay.op or r.shape[1] != s.shape[1]:
                raise ValueError(f"layer {name!r}: suspect {lay.op} {np.shape(lay.tensors['weight'])} vs reference "
                                 f"{ref[name].op} {np.shape(ref[name].tensors['weight'])}: the fan-in differs")
            _, nxt = channel_path(work, i)
            if known is None:
                v = input_slices(work[nxt], len(s)).reshape(len(s), -1).astype(np.float64)
                out = _outgoing(work, i, reference, len(s), len(r), state.get(work[nxt].name))
                origin, rep = _assign(s, r, np.linalg.norm(v, axis=1), merge, out)
            else:
                origin, rep = _known(s, r, known[name])
            done[name] = (rep, _restore_layer(work, i, r, origin, rep))
            est[name] = origin
        state = done
    return est, work


def fraction_restored(estimate: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray]) -> float:
    """Psi: the share of the suspect's neurons (over every permuted layer of ``truth``) whose
    estimated origin equals the true one (the reference neuron, or -1 for a dummy)."""
    hit = sum(int(np.sum(np.asarray(estimate[n]) == np.asarray(t))) for n, t in truth.items())
    return hit / sum(len(t) for t in truth.values())


def live_origins(suspect: list[Layer], truth: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``truth`` (the origins an obfuscation recorded) with ``-1`` for every suspect neuron whose
    incoming or outgoing weights are all zero (pruned away: it computes nothing, there is nothing
    to put back), the ground truth Psi is measured against."""
    out = {}
    for name, o in truth.items():
        i = next(k for k, l in enumerate(suspect) if l.name == name)
        s = rows(np.asarray(suspect[i].tensors["weight"]), suspect[i].op)
        v = input_slices(suspect[channel_path(suspect, i)[1]], len(s)).reshape(len(s), -1)
        out[name] = np.where(~np.any(s != 0, axis=1) | ~np.any(v != 0, axis=1), -1, np.asarray(o))
    return out
