"""Advising: choose the quant type that best fits a size or KL bound, from a measured report."""

from __future__ import annotations

from registry.models import QuantChoice, QuantReport
from tasks.errors import KilnError
from tasks.report.measure import NoQuantFits
from tasks.units import human_size

def choose_quant(report: QuantReport, max_size_bytes: int | None = None, max_kl: float | None = None
                 ) -> QuantChoice:
    """Pick the measured quant type that best fits the bounds.

    * `max_size_bytes` only: the lowest mean KL among the types whose file fits;
    * `max_kl` only: the smallest file among the types whose mean KL is at most `max_kl`;
    * both: the lowest KL among the types that satisfy both.
    The reference (f16) is not a candidate. Raises `NoQuantFits` when nothing qualifies.
    """
    if max_size_bytes is None and max_kl is None:
        raise KilnError("--quant auto needs a bound: --max-size (e.g. 500MB) or --max-kl (e.g. 0.05)")
    candidates = [r for r in report.rows if not r.is_reference]
    if not candidates:
        raise NoQuantFits("the report measured no quant types to choose from")
    bounds = " and ".join(
        b for b in (
            f"size ≤ {human_size(max_size_bytes)}" if max_size_bytes is not None else "",
            f"KL ≤ {max_kl:g}" if max_kl is not None else "",
        ) if b
    )
    rejected: dict[str, str] = {}
    fits = []
    for r in candidates:
        why = []
        if max_size_bytes is not None and r.size_bytes > max_size_bytes:
            why.append(f"{human_size(r.size_bytes)} is over {human_size(max_size_bytes)}")
        if max_kl is not None and r.kl_mean > max_kl:
            why.append(f"KL {r.kl_mean:.4f} is over {max_kl:g}")
        if why:
            rejected[r.quant] = "; ".join(why)
        else:
            fits.append(r)
    if not fits:
        smallest = min(candidates, key=lambda r: r.size_bytes)
        best = min(candidates, key=lambda r: r.kl_mean)
        hints = []
        if max_size_bytes is not None:
            hints.append(f"the smallest measured type, {smallest.quant}, is {human_size(smallest.size_bytes)} "
                         f"(KL {smallest.kl_mean:.4f})")
        if max_kl is not None:
            hints.append(f"the most faithful, {best.quant}, has KL {best.kl_mean:.4f} "
                         f"({human_size(best.size_bytes)})")
        raise NoQuantFits(
            f"no measured quant type ({', '.join(r.quant for r in candidates)}) satisfies {bounds}: "
            + "; ".join(hints) + ". Loosen the bound or name a quant type with --quant."
        )
    if max_size_bytes is not None:
        pick = min(fits, key=lambda r: (r.kl_mean, r.size_bytes))
        better = sorted((r for r in candidates if r.kl_mean < pick.kl_mean), key=lambda r: -r.kl_mean)
        reason = (f"{pick.quant} has the lowest KL divergence from {report.reference} "
                  f"({pick.kl_mean:.4f}, top-1 agreement {pick.top1_agreement:.1%}) of the "
                  f"{len(fits)} measured type(s) within {bounds}, at {human_size(pick.size_bytes)}")
        if better:
            nxt = better[0]
            reason += (f"; the next more faithful, {nxt.quant} (KL {nxt.kl_mean:.4f}), "
                       f"is out: {rejected.get(nxt.quant, 'not in bounds')}")
    else:
        pick = min(fits, key=lambda r: (r.size_bytes, r.kl_mean))
        smaller = sorted((r for r in candidates if r.size_bytes < pick.size_bytes), key=lambda r: -r.size_bytes)
        reason = (f"{pick.quant} is the smallest ({human_size(pick.size_bytes)}) of the {len(fits)} measured "
                  f"type(s) with {bounds}: its KL from {report.reference} is {pick.kl_mean:.4f}, "
                  f"top-1 agreement {pick.top1_agreement:.1%}")
        if smaller:
            nxt = smaller[0]
            reason += (f"; the next smaller, {nxt.quant} ({human_size(nxt.size_bytes)}), "
                       f"is out: {rejected.get(nxt.quant, 'not in bounds')}")
    reason += (f" (measured on {report.scored_tokens} tokens of {report.eval_text}"
               + (f", {report.chat_tokens} chat-answer tokens" if report.chat_tokens else "") + ")")
    return QuantChoice(
        quant=pick.quant, size_bytes=pick.size_bytes, kl_mean=pick.kl_mean,
        top1_agreement=pick.top1_agreement, reason=reason, max_size_bytes=max_size_bytes, max_kl=max_kl,
        considered=[r.quant for r in candidates], rejected=rejected,
    )
