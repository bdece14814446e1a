"""studies: many architectures at a time. Design spaces, sweeps on Ray, the results store.

Layering: scaler_cli -> studies -> trainers -> scaler. Importing `studies` is cheap: torch and ray
are imported only where trials run (`studies.sweep`, `studies.trial`).

    from studies.spaces import load_space
    from studies.results import load_records, dataframe
    space = load_space("nares")                 # 15,625 WRNs with exact params/FLOPs
    df = dataframe("study")                     # one row per trial, pandas
    records = load_records("study")             # NARes-format dicts
"""
