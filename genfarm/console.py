"""What every genfarm command prints with, and the help text the cluster commands share."""

from rich.console import Console

out = Console(soft_wrap=True)  # long paths stay on one line for grep and copy-paste
err = Console(stderr=True, soft_wrap=True)
ADDRESS_HELP = "The cluster's dashboard address (default: $GENFARM_CLUSTER or http://127.0.0.1:8265)."
