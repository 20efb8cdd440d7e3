-- The sqlite schema of edge-fleet at commit f6eb092, as its init_db (create_all
-- and the audit triggers) made it on an empty database, before migrations existed:
-- the DDL it ran, captured once. tests/fleet/test_migrations.py builds "legacy"
-- databases from it. Statements end with ';' at the end of a line.

CREATE TABLE device (
	id VARCHAR(64) NOT NULL,
	first_seen DATETIME NOT NULL,
	last_seen DATETIME,
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
	heartbeat_at DATETIME,
	labels JSON,
	tags JSON,
	PRIMARY KEY (id)
);

CREATE TABLE apitoken (
	id INTEGER NOT NULL,
	name VARCHAR(128) NOT NULL,
	role VARCHAR(8) NOT NULL,
	token_hash VARCHAR(64) NOT NULL,
	created_at DATETIME NOT NULL,
	revoked_at DATETIME,
	PRIMARY KEY (id)
);

CREATE UNIQUE INDEX ix_apitoken_token_hash ON apitoken (token_hash);

CREATE TABLE bundle (
	id INTEGER NOT NULL,
	name VARCHAR(128) NOT NULL,
	version INTEGER NOT NULL,
	target_name VARCHAR(256) NOT NULL,
	sha256 VARCHAR(64) NOT NULL,
	size BIGINT NOT NULL,
	runtime VARCHAR(16) NOT NULL,
	manifest JSON,
	published_at DATETIME NOT NULL,
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
	issued_at DATETIME NOT NULL,
	issued_by VARCHAR(128) NOT NULL,
	payload TEXT,
	publish_count INTEGER DEFAULT '0' NOT NULL,
	published_at DATETIME,
	PRIMARY KEY (device_id)
);

CREATE TABLE deviceevent (
	id INTEGER NOT NULL,
	device_id VARCHAR(64) NOT NULL,
	seq BIGINT NOT NULL,
	event VARCHAR(64) NOT NULL,
	detail JSON,
	sent_at DATETIME NOT NULL,
	received_at DATETIME NOT NULL,
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
	id INTEGER NOT NULL,
	device_id VARCHAR(64) NOT NULL,
	seq BIGINT NOT NULL,
	sent_at DATETIME NOT NULL,
	received_at DATETIME NOT NULL,
	PRIMARY KEY (id),
	UNIQUE (device_id, seq)
);

CREATE INDEX ix_heartbeat_received ON heartbeat (received_at);

CREATE INDEX ix_heartbeat_device_time ON heartbeat (device_id, sent_at);

CREATE TABLE audit_entry (
	seq BIGINT NOT NULL,
	at DATETIME NOT NULL,
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

CREATE INDEX ix_audit_entry_action ON audit_entry (action);

CREATE INDEX ix_audit_entry_subject ON audit_entry (subject);

CREATE INDEX ix_audit_entry_at ON audit_entry (at);

CREATE INDEX ix_audit_entry_actor ON audit_entry (actor);

CREATE TRIGGER IF NOT EXISTS audit_entry_no_update BEFORE UPDATE ON audit_entry BEGIN SELECT RAISE(ABORT, 'audit entries are append-only'); END;

CREATE TRIGGER IF NOT EXISTS audit_entry_no_delete BEFORE DELETE ON audit_entry BEGIN SELECT RAISE(ABORT, 'audit entries are append-only'); END;

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
	wave_started_at DATETIME,
	created_by VARCHAR(200) NOT NULL,
	created_at DATETIME NOT NULL,
	reason VARCHAR(1000),
	finished_at DATETIME,
	PRIMARY KEY (id)
);

CREATE INDEX ix_rollout_status ON rollout (status);

CREATE TABLE rollout_device (
	rollout_id VARCHAR(32) NOT NULL,
	device_id VARCHAR(64) NOT NULL,
	wave INTEGER NOT NULL,
	state VARCHAR(32) NOT NULL,
	notified_at DATETIME,
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
	created_at DATETIME NOT NULL,
	PRIMARY KEY (name)
);

CREATE TABLE bundle_baseline (
	id INTEGER NOT NULL,
	name VARCHAR(128) NOT NULL,
	version INTEGER NOT NULL,
	baseline JSON,
	PRIMARY KEY (id),
	UNIQUE (name, version)
);

CREATE TABLE drift_policy (
	model VARCHAR(128) NOT NULL,
	settings JSON,
	updated_at DATETIME NOT NULL,
	updated_by VARCHAR(200) NOT NULL,
	PRIMARY KEY (model)
);

CREATE TABLE drift_window (
	id INTEGER NOT NULL,
	device_id VARCHAR(64) NOT NULL,
	seq BIGINT NOT NULL,
	model VARCHAR(128) NOT NULL,
	version INTEGER NOT NULL,
	window_started_at DATETIME,
	window_ended_at DATETIME NOT NULL,
	received_at DATETIME NOT NULL,
	rows BIGINT,
	score FLOAT,
	features JSON,
	output_counts JSON,
	PRIMARY KEY (id),
	UNIQUE (device_id, seq)
);

CREATE INDEX ix_drift_window_device_time ON drift_window (device_id, window_ended_at);

CREATE INDEX ix_drift_window_received ON drift_window (received_at);

CREATE INDEX ix_drift_window_model_time ON drift_window (model, window_ended_at);

CREATE TABLE drift_alert (
	id INTEGER NOT NULL,
	device_id VARCHAR(64) NOT NULL,
	model VARCHAR(128) NOT NULL,
	version INTEGER NOT NULL,
	raised_at DATETIME NOT NULL,
	cleared_at DATETIME,
	last_window_at DATETIME NOT NULL,
	score FLOAT NOT NULL,
	peak_score FLOAT NOT NULL,
	features JSON,
	notice_pending BOOLEAN NOT NULL,
	notice_attempts INTEGER NOT NULL,
	notice_next_at DATETIME,
	notice_error VARCHAR(300),
	notices_sent INTEGER NOT NULL,
	PRIMARY KEY (id)
);

CREATE INDEX ix_drift_alert_device ON drift_alert (device_id, model);

CREATE INDEX ix_drift_alert_notice ON drift_alert (notice_pending);

