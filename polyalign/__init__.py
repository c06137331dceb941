"""polyalign: align language models with preferences and rewards.

Import-light on purpose: `import polyalign` pulls in nothing heavy. Import the part you need,
e.g. `from polyalign import losses` (torch only) or `from polyalign.models import load_policy`.
"""

__version__ = "0.1.0"
