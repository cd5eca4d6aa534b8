-- The pipeline's login roles, one per process kind, each a member of the group role holding
-- its privileges (cdc_consumer/roles.py; `python -m cdc_consumer migrate` grants them on every
-- run). Run once per database, as a superuser, before the first migrate:
--
--   psql -v ON_ERROR_STOP=1 -d outbox \
--     -v migrator_password=... -v web_password=... -v worker_password=... \
--     -v consumer_password=... -f deploy/postgres/roles.sql
--
-- Then the migrate job connects as pipeline_migrator, the web app as pipeline_web, the Celery
-- worker and Beat as pipeline_worker, the consumer as pipeline_consumer. Safe to run again: it
-- creates what is missing and sets the passwords given.

-- The group roles, which cannot log in. `migrate` creates them too when the migrator may
-- (CREATEROLE); creating them here means it need not.
SELECT format('CREATE ROLE %I NOLOGIN', name)
FROM unnest(ARRAY['outbox_web', 'outbox_maintenance', 'outbox_consumer']) AS name
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name)
\gexec

SELECT format('CREATE ROLE %I LOGIN', name)
FROM unnest(ARRAY['pipeline_migrator', 'pipeline_web', 'pipeline_worker', 'pipeline_consumer'])
    AS name
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = name)
\gexec

-- The migrator owns the database, and with it the public schema (PostgreSQL 15 and later):
-- it creates the tables, owns them, and grants on them. REPLICATION: it creates the slot.
ALTER ROLE pipeline_migrator NOSUPERUSER NOCREATEDB NOCREATEROLE REPLICATION
    PASSWORD :'migrator_password';
ALTER DATABASE :"DBNAME" OWNER TO pipeline_migrator;

ALTER ROLE pipeline_web NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    PASSWORD :'web_password';
GRANT outbox_web TO pipeline_web;

ALTER ROLE pipeline_worker NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
    PASSWORD :'worker_password';
GRANT outbox_maintenance TO pipeline_worker;

-- REPLICATION is an attribute of the login role: group membership does not carry it.
ALTER ROLE pipeline_consumer NOSUPERUSER NOCREATEDB NOCREATEROLE REPLICATION
    PASSWORD :'consumer_password';
GRANT outbox_consumer TO pipeline_consumer;
