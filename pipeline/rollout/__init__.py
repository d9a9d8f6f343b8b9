"""Continuous-learning A/B rollouts: outcomes, assignment, rollout state (see README "Rollouts")."""
