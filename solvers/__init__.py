"""Pure optimisation over plain data (numpy, scipy, networkx, pulp). Never imports torch or surgery."""
