-- The three databases a team's services keep (created on PostgreSQL's first start): MLflow's tracking store and
-- registry, Prefect's server, the serving ledger. Used by k8s (configMapGenerator) and docker-compose.yml.
CREATE DATABASE mlflow;
CREATE DATABASE prefect;
CREATE DATABASE ledger;
