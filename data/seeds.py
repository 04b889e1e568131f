"""Generator seeds with a fixed role, in one place. Training sets draw from other seeds (configs say which), so a
held-out set is never trained on; the floor sets share the held-out set's equipment contexts but not its noise.
Configs may override the held-out seed (a knob), and then default to these constants."""

OVERLAY_HELD_OUT = 90_001          # FID-N reference maps of IKDDiT (evaluate, sweeps, demo)
OVERLAY_FLOOR = 90_002             # same contexts as OVERLAY_HELD_OUT, independent wafer/measurement noise
OVERLAY_CONDITIONS = 90_003        # equipment contexts apps.sample conditions on when none are given
WAFER_HELD_OUT = 9_001             # held-out wafer maps of the classifier teacher, Fast-AD and distilled students
WAFER_FLOOR = 9_002                # class-matched real wafer maps scored against WAFER_HELD_OUT (DMD2's floor)
SEM_HELD_OUT = 91_001              # held-out SEM images (feature-extractor accuracy, defect segmentation, DMD2)
SEM_VALIDATION = 91_002            # SEM validation split (segmentation thresholds are chosen here, never on test)
WAFER_VALIDATION = 9_101           # wafer validation split (segmentation thresholds on the wafer domain)
SEM_FLOOR = 91_003                 # class-matched real SEM images scored against SEM_HELD_OUT (DMD2's floor)
FINGERPRINT = 2_024                # the machines' signatures (the same fab in every overlay set)


def check_not_held_out(seed: int, what: str, held_out: int) -> None:
    """Refuse a training seed that equals a held-out one (the score would then be on training data)."""
    if seed == held_out:
        raise ValueError(f"{what} {seed} is the held-out seed the evaluation compares against; pick another")
