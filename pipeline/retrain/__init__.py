"""The retraining stages as library functions: typed configuration in, typed results out.

    sites.py       read → validate → prepare each site (no torch, no MLflow: the data stages stay light)
    data.py        the arrays a run shares, built once: prepared sites and the CrossSim target split
    source.py      train the source model, evaluate it on every site
    adaptation.py  CrossSim on the trained model, scored beside it; the adapted models logged
    promotion.py   gate, serving bundles, model card, registration
    summary.py     what a retraining run returns, and its markdown

``flows/retrain.py`` makes each stage a Prefect task; ``crosssim <stage>`` and DVC call the same functions.
"""
