-- Zato SSO's tables as SQLAlchemy creates them on SQLite (on PostgreSQL alike, DATETIME being TIMESTAMP WITHOUT TIME ZONE there) from Zato's
-- zato/common/odb/model/sso.py (_SSOUser, _SSOSession, _SSOAttr): the columns, types,
-- constraints and indexes of that model. Used by the import tests to build a real
-- Zato database.
CREATE TABLE zato_sso_user (
	id INTEGER NOT NULL,
	user_id VARCHAR(191) NOT NULL,
	is_active BOOLEAN NOT NULL,
	is_internal BOOLEAN NOT NULL,
	is_super_user BOOLEAN NOT NULL,
	is_locked BOOLEAN NOT NULL,
	locked_time DATETIME,
	creation_ctx TEXT NOT NULL,
	locked_by VARCHAR(191),
	approval_status VARCHAR(191) NOT NULL,
	approval_status_mod_time DATETIME NOT NULL,
	approval_status_mod_by VARCHAR(191) NOT NULL,
	username VARCHAR(191) NOT NULL,
	password TEXT NOT NULL,
	password_is_set BOOLEAN NOT NULL,
	password_must_change BOOLEAN NOT NULL,
	password_last_set DATETIME NOT NULL,
	password_expiry DATETIME NOT NULL,
	sign_up_status VARCHAR(191) NOT NULL,
	sign_up_time DATETIME NOT NULL,
	sign_up_confirm_time DATETIME,
	sign_up_confirm_token VARCHAR(191) NOT NULL,
	email TEXT,
	display_name VARCHAR(191),
	first_name VARCHAR(191),
	middle_name VARCHAR(191),
	last_name VARCHAR(191),
	display_name_upper VARCHAR(191),
	first_name_upper VARCHAR(191),
	middle_name_upper VARCHAR(191),
	last_name_upper VARCHAR(191),
	opaque1 TEXT,
	PRIMARY KEY (id),
	CONSTRAINT zato_u_usrn_uq UNIQUE (username),
	CONSTRAINT zato_user_id_uq UNIQUE (user_id)
);
CREATE INDEX zato_u_email_idx ON zato_sso_user (email);
CREATE INDEX zato_u_appr_stat_idx ON zato_sso_user (approval_status);
CREATE INDEX zato_u_dspn_idx ON zato_sso_user (display_name_upper);
CREATE INDEX zato_u_alln_idx ON zato_sso_user (first_name_upper, middle_name_upper, last_name_upper);
CREATE INDEX zato_u_lastn_idx ON zato_sso_user (last_name_upper);
CREATE INDEX zato_u_sigst_idx ON zato_sso_user (sign_up_status);
CREATE UNIQUE INDEX zato_u_sigctok_idx ON zato_sso_user (sign_up_confirm_token);

CREATE TABLE zato_sso_session (
	id INTEGER NOT NULL,
	ust VARCHAR(191) NOT NULL,
	creation_time DATETIME NOT NULL,
	expiration_time DATETIME NOT NULL,
	remote_addr TEXT NOT NULL,
	user_agent TEXT NOT NULL,
	auth_type TEXT NOT NULL,
	auth_principal TEXT NOT NULL,
	opaque1 TEXT,
	user_id INTEGER NOT NULL,
	PRIMARY KEY (id),
	FOREIGN KEY(user_id) REFERENCES zato_sso_user (id) ON DELETE CASCADE
);
CREATE UNIQUE INDEX zato_sso_sust_idx ON zato_sso_session (ust);

CREATE TABLE zato_sso_attr (
	id INTEGER NOT NULL,
	creation_time DATETIME NOT NULL,
	last_modified DATETIME,
	expiration_time DATETIME,
	is_session_attr BOOLEAN NOT NULL,
	is_encrypted BOOLEAN NOT NULL,
	serial_method VARCHAR(20) NOT NULL,
	name VARCHAR(191) NOT NULL,
	value TEXT,
	_ust_string VARCHAR(191) NOT NULL,
	opaque1 TEXT,
	user_id VARCHAR(191) NOT NULL,
	ust VARCHAR(191),
	PRIMARY KEY (id),
	CONSTRAINT zato_attr_name_uq UNIQUE (name, is_session_attr, user_id, _ust_string),
	FOREIGN KEY(user_id) REFERENCES zato_sso_user (user_id) ON DELETE CASCADE,
	FOREIGN KEY(ust) REFERENCES zato_sso_session (ust) ON DELETE CASCADE
);
CREATE INDEX zato_attr_usr ON zato_sso_attr (user_id);
CREATE INDEX zato_attr_usr_ust ON zato_sso_attr (user_id, ust);
CREATE INDEX zato_attr_usr_name ON zato_sso_attr (user_id, name);
CREATE UNIQUE INDEX zato_attr_usr_ust_name ON zato_sso_attr (user_id, ust, name);
