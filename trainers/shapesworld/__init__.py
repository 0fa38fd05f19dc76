"""ShapesWorld, the embedded toy world: a synthetic image world whose every scene carries its exact facts.

A scene is 1-5 coloured shapes on a 3x3 grid (so "left of" / "above" are never ambiguous) over a
plain background (``scenes``). Questions and answers use a small closed grammar (``grammar``: one
registry entry per question type), so every answer is parsed back exactly:

    "The circle is red."                      color of the (only) circle
    "The red circle is large."                size
    "The red circle is at the top left."      position (grid cell names: POSITIONS)
    "There are 3 shapes." / "There is 1 red circle." / "There are 0 stars."   counts
    "There is no star in the image."          absence
    "There is a small red circle at the top." / "There is nothing at the center."
    "The red circle is larger than the blue star." / "The red circle and the blue star are the same size."
    "The background is white."
    "A white background with 2 shapes: large red circle at the top left, small blue star at the center."
    "Yes." / "No." / "B"

Each question is a ``spec`` dict (``{"type": "color", "shape": "circle"}``, picked per category by
``specs``); ``dataset`` writes the LLaVA-RLHF files and ``scoring`` scores any model against the facts.
"""
