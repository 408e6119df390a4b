"""The truth for one IVON step: plain float64 torch, written the way the IVON paper states it.

One call can fold a gradient sample into the running means, update the posterior, and draw the
next weight sample. With ``q = N(m, 1 / (ess * (h + wd)))`` and ``g``, ``nxg`` the averaged
gradient and noise-times-gradient over the step's samples:

    momentum <- b1 * momentum + (1 - b1) * g
    f        <- ess * nxg * (h + wd)            ("price")   or   ess * mean(g^2)   ("gradsq")
    h        <- b2 * h + (1 - b2) * f + (1 - b2)^2 / 2 * (h - f)^2 / (h + wd)
    m        <- m - lr * clip((momentum / debias + wd * m) / (h + wd), -clip_radius, clip_radius)
    theta    <- m + eps / sqrt(ess * (h + wd))
"""

from __future__ import annotations



def noise_scale(hess, ess: float, weight_decay: float):
    """The posterior standard deviation ``1 / sqrt(ess * (h + wd))``."""
    return 1.0 / (ess * (hess.double() + weight_decay)).sqrt()


def ivon_step_reference(mean, momentum, hess, scalars, *, grad=None, count=1, avg_grad=None, avg_hess_stat=None,
                        update=True, eps_now=None, eps_next=None, draw_ess=None, hess_approx="price"):
    """Returns a dict of float64 results: ``avg_grad``/``avg_hess_stat`` (after folding ``grad``),
    and, when ``update``, ``momentum``, ``hess``, ``mean``; ``sample`` when ``eps_next`` is given."""
    s = scalars
    m, mom, h = mean.double(), momentum.double(), hess.double()
    out = {}
    g_avg = None if avg_grad is None else avg_grad.double()
    h_avg = None if avg_hess_stat is None else avg_hess_stat.double()
    if grad is not None:
        g = grad.double()
        if hess_approx == "price":
            stat = eps_now.double() * noise_scale(h, s.ess, s.weight_decay) * g
        else:
            stat = g * g
        if count > 1:
            g_avg = g_avg + (g - g_avg) / count
            h_avg = h_avg + (stat - h_avg) / count
        else:
            g_avg, h_avg = g, stat
    out["avg_grad"], out["avg_hess_stat"] = g_avg, h_avg
    if update:
        mom = s.beta1 * mom + (1 - s.beta1) * g_avg
        f = s.ess * h_avg * ((h + s.weight_decay) if hess_approx == "price" else 1.0)
        h = s.beta2 * h + (1 - s.beta2) * f + 0.5 * (1 - s.beta2) ** 2 * (h - f) ** 2 / (h + s.weight_decay)
        step = ((mom / s.debias + s.weight_decay * m) / (h + s.weight_decay)).clamp(-s.clip_radius, s.clip_radius)
        m = m - s.lr * step
        out.update(momentum=mom, hess=h, mean=m)
    if eps_next is not None:
        ess = s.ess if draw_ess is None else draw_ess
        out["sample"] = m + eps_next.double() * noise_scale(h, ess, s.weight_decay)
    return out
