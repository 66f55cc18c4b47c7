"""What the passes share; no pass imports another pass.

    query.py      read-only questions about a graph: constants, shapes, purity, aliasing, readers
    rewrite.py    the helpers that change a graph: new constants, carried metadata, replacing a matched chain
    patterns.py   recognizers: conv / linear / batch norm / activation / add, in every spelling, as records
    epilogue.py   the residual add and activation a fused conv or linear absorbs
    bn_fold.py    folding a BatchNorm into the conv or linear before it
    layout.py     channels-last planning and its guards
    onednn.py     the oneDNN ops the CPU lowerings write, for the passes that look for them
    describe.py   readable names and the networkx view of a graph, for the dumps and the explorer
"""
