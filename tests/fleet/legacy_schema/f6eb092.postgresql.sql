-- The postgresql schema of edge-fleet at commit f6eb092, as its init_db (create_all
-- and the audit triggers) made it on an empty database, before migrations existed:
-- the DDL it ran, captured once. tests/fleet/test_migrations.py builds "legacy"
-- databases from it. Statements end with ';' at the end of a line.

CREATE TYPE role AS ENUM ('VIEWER', 'OPERATOR', 'ADMIN');

CREATE TABLE device (
	id VARCHAR(64) NOT NULL,
	first_seen TIMESTAMP WITH TIME ZONE NOT NULL,
	last_seen TIMESTAMP WITH TIME ZONE,
	online BOOLEAN NOT NULL,
	connection BIGINT NOT NULL,
	agent_version VARCHAR(256),
	active_model_name VARCHAR(256),
	active_model_version INTEGER,
	platform JSON,
	desired_generation BIGINT,
	reported_seq BIGINT NOT NULL,
	heartbeat_seq BIGINT NOT NULL,
	heartbeat JSON,
	heartbeat_at TIMESTAMP WITH TIME ZONE,
	labels JSON,
	tags JSON,
	PRIMARY KEY (id)
)
 WITH (fillfactor = 50);

CREATE TABLE apitoken (
	id SERIAL NOT NULL,
	name VARCHAR(128) NOT NULL,
	role role NOT NULL,
	token_hash VARCHAR(64) NOT NULL,
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	revoked_at TIMESTAMP WITH TIME ZONE,
	PRIMARY KEY (id)
);

CREATE UNIQUE INDEX ix_apitoken_token_hash ON apitoken (token_hash);

CREATE TABLE bundle (
	id SERIAL NOT NULL,
	name VARCHAR(128) NOT NULL,
	version INTEGER NOT NULL,
	target_name VARCHAR(256) NOT NULL,
	sha256 VARCHAR(64) NOT NULL,
	size BIGINT NOT NULL,
	runtime VARCHAR(16) NOT NULL,
	manifest JSON,
	published_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (name, version),
	UNIQUE (target_name)
);

CREATE INDEX ix_bundle_name ON bundle (name);

CREATE TABLE devicedesired (
	device_id VARCHAR(64) NOT NULL,
	generation BIGINT NOT NULL,
	bundle_name VARCHAR(128),
	bundle_version INTEGER,
	issued_at TIMESTAMP WITH TIME ZONE NOT NULL,
	issued_by VARCHAR(128) NOT NULL,
	payload TEXT,
	publish_count INTEGER DEFAULT '0' NOT NULL,
	published_at TIMESTAMP WITH TIME ZONE,
	PRIMARY KEY (device_id)
);

CREATE TABLE deviceevent (
	id SERIAL NOT NULL,
	device_id VARCHAR(64) NOT NULL,
	seq BIGINT NOT NULL,
	event VARCHAR(64) NOT NULL,
	detail JSON,
	sent_at TIMESTAMP WITH TIME ZONE NOT NULL,
	received_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (device_id, seq)
);

CREATE INDEX ix_deviceevent_device_id ON deviceevent (device_id);

CREATE TABLE heartbeat (
	uptime_s FLOAT NOT NULL,
	cpu_percent FLOAT NOT NULL,
	rss_mb FLOAT NOT NULL,
	inference_count BIGINT NOT NULL,
	error_count BIGINT NOT NULL,
	client_error_count BIGINT DEFAULT '0' NOT NULL,
	latency_ms_p50 FLOAT,
	latency_ms_p95 FLOAT,
	outbox_depth BIGINT,
	id BIGSERIAL NOT NULL,
	device_id VARCHAR(64) NOT NULL,
	seq BIGINT NOT NULL,
	sent_at TIMESTAMP WITH TIME ZONE NOT NULL,
	received_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (device_id, seq)
);

CREATE INDEX ix_heartbeat_device_time ON heartbeat (device_id, sent_at);

CREATE INDEX ix_heartbeat_received ON heartbeat (received_at);

CREATE TABLE audit_entry (
	seq BIGINT NOT NULL,
	at TIMESTAMP WITH TIME ZONE NOT NULL,
	actor VARCHAR(200) NOT NULL,
	action VARCHAR(64) NOT NULL,
	subject VARCHAR(256) NOT NULL,
	reason VARCHAR(1000) NOT NULL,
	details JSON NOT NULL,
	prev_hash VARCHAR(64) NOT NULL,
	hash VARCHAR(64) NOT NULL,
	PRIMARY KEY (seq)
);

CREATE INDEX ix_audit_entry_hash ON audit_entry (hash);

CREATE INDEX ix_audit_entry_at ON audit_entry (at);

CREATE INDEX ix_audit_entry_action ON audit_entry (action);

CREATE INDEX ix_audit_entry_subject ON audit_entry (subject);

CREATE INDEX ix_audit_entry_actor ON audit_entry (actor);

CREATE OR REPLACE FUNCTION audit_entry_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION USING MESSAGE = 'audit entries are append-only (' || TG_OP || ' refused)'; END $$;

CREATE TRIGGER audit_entry_append_only BEFORE UPDATE OR DELETE ON audit_entry FOR EACH ROW EXECUTE FUNCTION audit_entry_append_only();

CREATE TRIGGER audit_entry_no_truncate BEFORE TRUNCATE ON audit_entry FOR EACH STATEMENT EXECUTE FUNCTION audit_entry_append_only();

CREATE TABLE audit_head (
	id INTEGER NOT NULL,
	seq BIGINT NOT NULL,
	hash VARCHAR(64) NOT NULL,
	PRIMARY KEY (id)
);

CREATE TABLE rollout (
	id VARCHAR(32) NOT NULL,
	bundle_name VARCHAR(128) NOT NULL,
	bundle_version INTEGER NOT NULL,
	selector VARCHAR(1024),
	policy JSON NOT NULL,
	status VARCHAR(32) NOT NULL,
	wave INTEGER NOT NULL,
	wave_started_at TIMESTAMP WITH TIME ZONE,
	created_by VARCHAR(200) NOT NULL,
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	reason VARCHAR(1000),
	finished_at TIMESTAMP WITH TIME ZONE,
	PRIMARY KEY (id)
);

CREATE INDEX ix_rollout_status ON rollout (status);

CREATE TABLE rollout_device (
	rollout_id VARCHAR(32) NOT NULL,
	device_id VARCHAR(64) NOT NULL,
	wave INTEGER NOT NULL,
	state VARCHAR(32) NOT NULL,
	notified_at TIMESTAMP WITH TIME ZONE,
	redrives INTEGER NOT NULL,
	rolled_back_by_device BOOLEAN NOT NULL,
	prev_bundle_name VARCHAR(128),
	prev_bundle_version INTEGER,
	inferences_at_install BIGINT NOT NULL,
	model_errors_at_install BIGINT NOT NULL,
	client_errors_at_install BIGINT NOT NULL,
	latency_p95_before FLOAT,
	connection_at_notify BIGINT NOT NULL,
	uptime_at_notify FLOAT,
	PRIMARY KEY (rollout_id, device_id)
);

CREATE INDEX ix_rollout_device_device ON rollout_device (device_id);

CREATE TABLE protected_group (
	name VARCHAR(64) NOT NULL,
	selector VARCHAR(1024) NOT NULL,
	created_by VARCHAR(200) NOT NULL,
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (name)
);

CREATE TABLE bundle_baseline (
	id SERIAL NOT NULL,
	name VARCHAR(128) NOT NULL,
	version INTEGER NOT NULL,
	baseline JSON,
	PRIMARY KEY (id),
	UNIQUE (name, version)
);

CREATE TABLE drift_policy (
	model VARCHAR(128) NOT NULL,
	settings JSON,
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
	updated_by VARCHAR(200) NOT NULL,
	PRIMARY KEY (model)
);

CREATE TABLE drift_window (
	id BIGSERIAL NOT NULL,
	device_id VARCHAR(64) NOT NULL,
	seq BIGINT NOT NULL,
	model VARCHAR(128) NOT NULL,
	version INTEGER NOT NULL,
	window_started_at TIMESTAMP WITH TIME ZONE,
	window_ended_at TIMESTAMP WITH TIME ZONE NOT NULL,
	received_at TIMESTAMP WITH TIME ZONE NOT NULL,
	rows BIGINT,
	score FLOAT,
	features JSON,
	output_counts JSON,
	PRIMARY KEY (id),
	UNIQUE (device_id, seq)
);

CREATE INDEX ix_drift_window_model_time ON drift_window (model, window_ended_at);

CREATE INDEX ix_drift_window_device_time ON drift_window (device_id, window_ended_at);

CREATE INDEX ix_drift_window_received ON drift_window (received_at);

CREATE TABLE drift_alert (
	id SERIAL NOT NULL,
	device_id VARCHAR(64) NOT NULL,
	model VARCHAR(128) NOT NULL,
	version INTEGER NOT NULL,
	raised_at TIMESTAMP WITH TIME ZONE NOT NULL,
	cleared_at TIMESTAMP WITH TIME ZONE,
	last_window_at TIMESTAMP WITH TIME ZONE NOT NULL,
	score FLOAT NOT NULL,
	peak_score FLOAT NOT NULL,
	features JSON,
	notice_pending BOOLEAN NOT NULL,
	notice_attempts INTEGER NOT NULL,
	notice_next_at TIMESTAMP WITH TIME ZONE,
	notice_error VARCHAR(300),
	notices_sent INTEGER NOT NULL,
	PRIMARY KEY (id)
);

CREATE INDEX ix_drift_alert_device ON drift_alert (device_id, model);

CREATE INDEX ix_drift_alert_notice ON drift_alert (notice_pending);

