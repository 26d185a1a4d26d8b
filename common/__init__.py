"""What every package may use: files written whole, and typed option trees bound to the command
line and to files.

The bottom layer: imports nothing else of moco_dali, and nothing heavier than the standard
library and PyYAML, so every command can import it before deciding what else to load.
"""
