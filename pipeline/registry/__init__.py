"""Model registry: register a run's model as ``challenger``, gate it against ``champion`` per site,
let a reviewer approve/reject/roll back, and keep an append-only audit trail of every decision.

- store.py: the MLflow Model Registry behind a small adapter; alias moves are all-or-nothing.
- gate.py:  per-site scores (AUC, sensitivity at a fixed specificity) and the promotion rule.
- audit.py: who did what, when, why and on which evidence: tags + one artifact per action.
- review.py: register / approve / reject / rollback, each one transaction + one audit entry.
- card.py:  the model card (Markdown) attached to a registered version.
"""
