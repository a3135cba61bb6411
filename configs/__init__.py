"""The training recipes (YAML), installed as fastvq.configs so `fastvq train --config <name>`
finds them without the repository."""
