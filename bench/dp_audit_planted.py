"""Self-test of the audit: ``memtrain-bench dp-audit`` with a noise bug planted in ``DPOptimizer`` or ``DPZOSGD``.

    python -m memtrain.bench.dp_audit_planted sqrtL --out bench/results/dp-audit/planted-sqrtL
    python -m memtrain.bench.dp_audit_planted skip-group --out bench/results/dp-audit/planted-skip-group
    python -m memtrain.bench.dp_audit_planted noise-tenth --optimizer dpzo --out bench/results/dpzo-audit/planted-tenth

``sqrtL``: every group gets noise std σ·C_l instead of σ·C_total (effective multiplier σ/√L);
``skip-group``: one block's group gets no noise; ``noise-tenth`` (with ``--optimizer dpzo``): DPZOSGD's noise is
σC/10 (effective multiplier σ/10). Any other option is passed to ``dp-audit``. The record says ``"planted"``: its
figures describe a deliberately broken mechanism, never the library's.
"""

from __future__ import annotations

import sys

from flashdp.optimizer import DPOptimizer
from zo2.dp_optimizer import DPZOSGD

from . import cli

SKIPPED = "blocks.3.weight"  # the parameter whose group the skip-group plant leaves without noise
# name: (class, method, replacement given the original)
PLANTS = {
    "sqrtL": (DPOptimizer, "group_noise_std",
              lambda orig: lambda self, name: self.noise_multiplier * self.privacy.threshold_of[name]),
    "skip-group": (DPOptimizer, "group_noise_std",
                   lambda orig: lambda self, name: 0.0 if name == SKIPPED else orig(self, name)),
    "noise-tenth": (DPZOSGD, "_noise", lambda orig: lambda self, *args: 0.1 * orig(self, *args)),
}
OPTIMIZER = {"sqrtL": "flashdp", "skip-group": "flashdp", "noise-tenth": "dpzo"}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in PLANTS:
        raise SystemExit(f"usage: python -m memtrain.bench.dp_audit_planted {{{','.join(PLANTS)}}} [dp-audit options]")
    plant, rest = argv[0], argv[1:]
    args = cli.parse_args(["dp-audit", *rest])
    if args.optimizer != OPTIMIZER[plant]:
        raise SystemExit(f"the {plant!r} plant is in the {OPTIMIZER[plant]} mechanism: pass --optimizer "
                         f"{OPTIMIZER[plant]}")
    cls, method, replacement = PLANTS[plant]
    orig = getattr(cls, method)
    setattr(cls, method, replacement(orig))
    try:
        record = cli.run_dp_audit(args, None, planted=plant)  # the record's command: this script's, as run
    finally:
        setattr(cls, method, orig)
    print(f"PLANTED BUG {plant!r}: a self-test of the audit, not the library's mechanism "
          f"(lower bound {record['audit']['epsilon_lower_bound']:.3f})")


if __name__ == "__main__":
    main()
