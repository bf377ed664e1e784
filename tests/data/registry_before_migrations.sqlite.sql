-- A registry database made by artifactfs before schema migrations (create_all, commit 2d2083d),
-- with three versions in two collections: tests/test_migrations.py upgrades it.  sqlite3 iterdump.
BEGIN TRANSACTION;
CREATE TABLE aliases (
	collection_id INTEGER NOT NULL, 
	alias VARCHAR(128) NOT NULL, 
	version_id VARCHAR(32) NOT NULL, 
	PRIMARY KEY (collection_id, alias), 
	FOREIGN KEY(collection_id) REFERENCES collections (id) ON DELETE CASCADE, 
	FOREIGN KEY(version_id) REFERENCES versions (id) ON DELETE CASCADE
);
INSERT INTO "aliases" VALUES(1,'best','d24013e392f14e32b49ad903270b16fd');
INSERT INTO "aliases" VALUES(1,'latest','22d971adec2c42aaae7b89d65b9cda85');
INSERT INTO "aliases" VALUES(2,'latest','f6bc897d6d74491f951b22095a4216d0');
CREATE TABLE blob_blockmaps (
	entity_id INTEGER NOT NULL, 
	md5 VARCHAR(32) NOT NULL, 
	size BIGINT NOT NULL, 
	block_size INTEGER NOT NULL, 
	hashes BLOB NOT NULL, 
	PRIMARY KEY (entity_id, md5), 
	FOREIGN KEY(entity_id) REFERENCES entities (id) ON DELETE CASCADE
);
CREATE TABLE blobs (
	entity_id INTEGER NOT NULL, 
	md5 VARCHAR(32) NOT NULL, 
	size BIGINT NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (entity_id, md5), 
	FOREIGN KEY(entity_id) REFERENCES entities (id) ON DELETE CASCADE
);
INSERT INTO "blobs" VALUES(1,'2c1743a391305fbf367df8e4f069f9f9',5,'2026-12-02 06:26:13.514485');
INSERT INTO "blobs" VALUES(1,'a63c90cc3684ad8b0a2176a6a8fe9005',10,'2026-12-02 06:26:13.517813');
INSERT INTO "blobs" VALUES(1,'933dd710f56628d9dc2d22443a2f74b8',246,'2026-12-02 06:26:13.519499');
INSERT INTO "blobs" VALUES(1,'e155e9e3166af131136a8fcb84eb9462',6,'2026-12-02 06:26:13.530014');
INSERT INTO "blobs" VALUES(1,'c4dcdbcb4470a9f3259420f131185648',183,'2026-12-02 06:26:13.531486');
INSERT INTO "blobs" VALUES(1,'9dd4e461268c8034f5c8564e155c67a6',1,'2026-12-02 06:26:13.536139');
INSERT INTO "blobs" VALUES(1,'8f05bb6dc249479018dbc1172fba3365',179,'2026-12-02 06:26:13.537678');
CREATE TABLE collection_tags (
	collection_id INTEGER NOT NULL, 
	tag VARCHAR(128) NOT NULL, 
	PRIMARY KEY (collection_id, tag), 
	FOREIGN KEY(collection_id) REFERENCES collections (id) ON DELETE CASCADE
);
CREATE TABLE collections (
	id INTEGER NOT NULL, 
	project_id INTEGER NOT NULL, 
	name VARCHAR(128) NOT NULL, 
	type VARCHAR(128) NOT NULL, 
	description TEXT, 
	created_at DATETIME NOT NULL, 
	next_index INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (project_id, name), 
	FOREIGN KEY(project_id) REFERENCES projects (id) ON DELETE CASCADE
);
INSERT INTO "collections" VALUES(1,1,'ds','dataset',NULL,'2026-12-02 06:26:13.521598',2,'sequence');
INSERT INTO "collections" VALUES(2,1,'model','model',NULL,'2026-12-02 06:26:13.538879',1,'sequence');
CREATE TABLE entities (
	id INTEGER NOT NULL, 
	name VARCHAR(128) NOT NULL, 
	created_at DATETIME NOT NULL, 
	default_ttl_seconds FLOAT, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);
INSERT INTO "entities" VALUES(1,'ent','2026-12-02 06:26:13.514772',NULL);
CREATE TABLE projects (
	id INTEGER NOT NULL, 
	entity_id INTEGER NOT NULL, 
	name VARCHAR(128) NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (entity_id, name), 
	FOREIGN KEY(entity_id) REFERENCES entities (id) ON DELETE CASCADE
);
INSERT INTO "projects" VALUES(1,1,'proj','2026-12-02 06:26:13.521919');
CREATE TABLE runs (
	pk INTEGER NOT NULL, 
	project_id INTEGER NOT NULL, 
	run_id VARCHAR(128) NOT NULL, 
	name VARCHAR(256), 
	job_type VARCHAR(128), 
	config JSON NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (pk), 
	UNIQUE (project_id, run_id), 
	FOREIGN KEY(project_id) REFERENCES projects (id) ON DELETE CASCADE
);
CREATE TABLE usages (
	run_pk INTEGER NOT NULL, 
	version_id VARCHAR(32) NOT NULL, 
	use_as VARCHAR(128), 
	PRIMARY KEY (run_pk, version_id), 
	FOREIGN KEY(run_pk) REFERENCES runs (pk) ON DELETE CASCADE, 
	FOREIGN KEY(version_id) REFERENCES versions (id) ON DELETE CASCADE
);
CREATE TABLE version_tags (
	version_id VARCHAR(32) NOT NULL, 
	tag VARCHAR(128) NOT NULL, 
	PRIMARY KEY (version_id, tag), 
	FOREIGN KEY(version_id) REFERENCES versions (id) ON DELETE CASCADE
);
CREATE TABLE versions (
	id VARCHAR(32) NOT NULL, 
	collection_id INTEGER NOT NULL, 
	idx INTEGER NOT NULL, 
	digest VARCHAR(64) NOT NULL, 
	manifest_md5 VARCHAR(32) NOT NULL, 
	size BIGINT NOT NULL, 
	file_count BIGINT NOT NULL, 
	description TEXT, 
	meta JSON NOT NULL, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	ttl_seconds FLOAT, 
	state VARCHAR(16) NOT NULL, 
	run_pk INTEGER, 
	source_id VARCHAR(32), 
	PRIMARY KEY (id), 
	UNIQUE (collection_id, idx), 
	FOREIGN KEY(collection_id) REFERENCES collections (id) ON DELETE CASCADE, 
	FOREIGN KEY(run_pk) REFERENCES runs (pk) ON DELETE SET NULL, 
	FOREIGN KEY(source_id) REFERENCES versions (id) ON DELETE CASCADE
);
INSERT INTO "versions" VALUES('d24013e392f14e32b49ad903270b16fd',1,0,'33c5795db849e9309ba6de3d792494ae','933dd710f56628d9dc2d22443a2f74b8',15,2,NULL,'{}','2026-12-02 06:26:13.521598','2026-12-02 06:26:13.521598',NULL,'COMMITTED',NULL,NULL);
INSERT INTO "versions" VALUES('22d971adec2c42aaae7b89d65b9cda85',1,1,'38fca8aa26261b55bf2b9a3c5e7ba3d6','c4dcdbcb4470a9f3259420f131185648',6,1,'second','{}','2026-12-02 06:26:13.532950','2026-12-02 06:26:13.532950',NULL,'COMMITTED',NULL,NULL);
INSERT INTO "versions" VALUES('f6bc897d6d74491f951b22095a4216d0',2,0,'d156a6d236e55cd4cf55bab99f190502','8f05bb6dc249479018dbc1172fba3365',1,1,NULL,'{}','2026-12-02 06:26:13.538879','2026-12-02 06:26:13.538879',NULL,'COMMITTED',NULL,NULL);
CREATE INDEX versions_by_run ON versions (run_pk);
CREATE INDEX versions_by_source ON versions (source_id);
CREATE INDEX aliases_by_version ON aliases (version_id);
CREATE INDEX usages_by_version ON usages (version_id);
COMMIT;
