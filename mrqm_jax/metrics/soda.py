"""SODA-D's evaluation settings (SODA-mmdetection `mmdet/datasets/sodad_eval/sodadeval.py`, `SODADParams`).

SODADeval is pycocotools' COCOeval with other area ranges and maxDets, and with `iscrowd` forced to 0; its
`summarize()` reports everything on the 'Small' band. `coco.py` runs pycocotools' COCOeval with these settings,
which gives the same numbers because our ground truth has no crowd or ignore-flagged boxes (see `coco.py`).

Area ranges are closed intervals [lo, hi] in px^2 of box area (pycocotools marks a box outside
`area < lo or area > hi`), so a box of area exactly 144 counts in both eS and rS, as in the official evaluator.
"""

# (key suffix, official label, lo, hi). 'Small' is the headline band: AP = AP on objects of area <= 32^2.
AREA_RANGES = (
    ('', 'Small', 0.0, 32.0 ** 2),
    ('_eS', 'eS', 0.0, 12.0 ** 2),       # extremely small
    ('_rS', 'rS', 12.0 ** 2, 20.0 ** 2),  # relatively small
    ('_gS', 'gS', 20.0 ** 2, 32.0 ** 2),  # generally small
    ('_N', 'Normal', 32.0 ** 2, 40.0 * 50.0),
)
# SODADeval's evaluate() is called with maxDets = proposal_nums = (100, 300, 1000); AP uses maxDets[0].
AP_MAX_DETS = 100
RECALL_MAX_DETS = (100, 300, 1000)
