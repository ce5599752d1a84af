"""Image-quality flag names, the order they are listed in, and the defaults
of their thresholds.

`busi_core.quality.check` computes them on the resized pixels; preprocessing
stores the names that fire, joined by QUALITY_FLAG_SEPARATOR, in the
`quality_flags` feature (`schemas.features.FEATURE_QUALITY_FLAGS`).
"""

# A colour overlay (Doppler, elastography, coloured calipers): more than
# DEFAULT_QUALITY_COLOUR_SHARE of the pixels have channels further apart than
# DEFAULT_QUALITY_COLOUR_TOLERANCE.
FLAG_COLOUR = "colour"
# A blank or near-constant frame: grey standard deviation below
# DEFAULT_QUALITY_BLANK_STD.
FLAG_BLANK = "blank"
# Very low contrast: 99th minus 1st percentile of grey below
# DEFAULT_QUALITY_MIN_CONTRAST.
FLAG_LOW_CONTRAST = "low_contrast"
# A tiny original: its shorter side below DEFAULT_QUALITY_MIN_SIDE pixels.
FLAG_TINY = "tiny"
# An extreme shape: the original's longer side over
# DEFAULT_QUALITY_MAX_ASPECT_RATIO times its shorter one.
FLAG_ASPECT_RATIO = "aspect_ratio"

# A DICOM whose Burned In Annotation (0028,0301) is YES: text (possibly
# patient data) is part of the pixels. Set from the header, not measured.
FLAG_BURNED_IN_ANNOTATION = "burned_in_annotation"

# The order flags are listed in, in records and tables.
QUALITY_FLAGS = (FLAG_COLOUR, FLAG_BLANK, FLAG_LOW_CONTRAST, FLAG_TINY,
                 FLAG_ASPECT_RATIO, FLAG_BURNED_IN_ANNOTATION)
QUALITY_FLAG_SEPARATOR = ","

# The defaults below were measured on the 623 BUSI development images at
# 224×224 (README, "Image-quality flags"); none fires on their grey scans.

# Grey levels (0-255) by which a pixel's channels must differ to count as
# colour: above JPEG chroma noise on grey frames (a few levels) and above
# the spread BUSI's dimmest annotation lines keep after resizing (under 32),
# far below Doppler flow colours (over 200).
DEFAULT_QUALITY_COLOUR_TOLERANCE = 24
# Share (0-1) of colour pixels above which FLAG_COLOUR fires: 0.1 %, about
# 50 pixels at 224×224. BUSI's colour-Doppler frames have 0.24-1.4 % (a few
# small flow blobs, the colour box, yellow calipers and text); a small
# coloured body-marker icon has 0.03 % and does not fire.
DEFAULT_QUALITY_COLOUR_SHARE = 0.001
# Grey standard deviation below which FLAG_BLANK fires; BUSI's lowest is 27.
DEFAULT_QUALITY_BLANK_STD = 4.0
# Grey levels between the 1st and 99th percentiles below which
# FLAG_LOW_CONTRAST fires (a quarter of the 8-bit range); BUSI's lowest is
# 119. A blank frame fires this too.
DEFAULT_QUALITY_MIN_CONTRAST = 64
# Shorter side of the original, in pixels, below which FLAG_TINY fires: the
# model would see a third or less of its 224² input's pixels as real detail.
# BUSI's smallest is 190.
DEFAULT_QUALITY_MIN_SIDE = 128
# Longer side / shorter side of the original above which FLAG_ASPECT_RATIO
# fires: squashed to a square, shapes (a lesion's "taller than wide") are
# distorted past what training saw. BUSI's widest is 2.05 (780×380); two 4:3
# frames side by side (2.67) fire.
DEFAULT_QUALITY_MAX_ASPECT_RATIO = 2.5
