"""`python -m peft_visual_prompt.cli`: the same as the `peft-visual-prompt` console command."""

import sys

from . import main

sys.exit(main())
