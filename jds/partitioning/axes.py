"""The logical axis vocabulary.

Every parameter and every large activation names its dimensions with these logical axes.
``rules.py`` maps them onto mesh axes; changing the parallel layout is changing the rules,
never the model. Each axis has a one-letter code used as a variable suffix
(``x_BTD``, ``wq_DNH``) so shapes read off the code.
"""

from __future__ import annotations

AXIS_LETTERS: dict[str, str] = {
    "batch": "B",
    "seq": "T",
    "res_seq": "R",  # the sequence axis of the residual stream between sublayers
    "embed": "D",
    "heads": "N",
    "kv_heads": "K",
    "head_dim": "H",
    "mlp": "F",
    "vocab": "V",
    "layers": "L",
}

LOGICAL_AXES: tuple[str, ...] = tuple(AXIS_LETTERS)


def check_axes(axes: tuple[str | None, ...], *, what: str) -> None:
    """Raise ``ValueError`` if ``axes`` holds a name outside the vocabulary.

    Args:
      axes: logical names (``None`` for an unnamed dimension).
      what: the parameter or activation being checked, for the message.
    """
    bad = [a for a in axes if a is not None and a not in AXIS_LETTERS]
    if bad:
        raise ValueError(
            f"{what}: unknown logical axis {bad}; known axes are {list(LOGICAL_AXES)} "
            "(jds/partitioning/axes.py)"
        )
