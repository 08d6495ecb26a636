"""Which experts a trained model uses for which text: usage matrices, specialisation, heat maps.

``usage``: router statistics of an exported model per domain and per document;
``specialisation``: how much of a domain's routing its own few experts carry, and the mutual
information between domain and expert; ``heatmap``: domain × expert pictures, experts ordered
by clustering. tools/analyze_experts.py is the command line; ``extras``: the check that its
optional packages are installed, shared with the other tools that need one.
"""
