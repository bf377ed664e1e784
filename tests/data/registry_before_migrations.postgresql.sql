-- A registry database made by artifactfs before schema migrations (create_all, commit 2d2083d),
-- with three versions in two collections: tests/test_migrations.py upgrades it.  pg_dump --inserts.
--
-- PostgreSQL database dump
--


-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

SET default_tablespace = '';

SET default_table_access_method = heap;

--
-- Name: aliases; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.aliases (
    collection_id integer NOT NULL,
    alias character varying(128) NOT NULL,
    version_id character varying(32) NOT NULL
);


--
-- Name: blob_blockmaps; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.blob_blockmaps (
    entity_id integer NOT NULL,
    md5 character varying(32) NOT NULL,
    size bigint NOT NULL,
    block_size integer NOT NULL,
    hashes bytea NOT NULL
);


--
-- Name: blobs; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.blobs (
    entity_id integer NOT NULL,
    md5 character varying(32) NOT NULL,
    size bigint NOT NULL,
    created_at timestamp with time zone NOT NULL
);


--
-- Name: collection_tags; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.collection_tags (
    collection_id integer NOT NULL,
    tag character varying(128) NOT NULL
);


--
-- Name: collections; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.collections (
    id integer NOT NULL,
    project_id integer NOT NULL,
    name character varying(128) NOT NULL,
    type character varying(128) NOT NULL,
    description text,
    created_at timestamp with time zone NOT NULL,
    next_index integer NOT NULL,
    kind character varying(16) NOT NULL
);


--
-- Name: collections_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.collections_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: collections_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.collections_id_seq OWNED BY public.collections.id;


--
-- Name: entities; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.entities (
    id integer NOT NULL,
    name character varying(128) NOT NULL,
    created_at timestamp with time zone NOT NULL,
    default_ttl_seconds double precision
);


--
-- Name: entities_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.entities_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: entities_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.entities_id_seq OWNED BY public.entities.id;


--
-- Name: projects; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.projects (
    id integer NOT NULL,
    entity_id integer NOT NULL,
    name character varying(128) NOT NULL,
    created_at timestamp with time zone NOT NULL
);


--
-- Name: projects_id_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.projects_id_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: projects_id_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.projects_id_seq OWNED BY public.projects.id;


--
-- Name: runs; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.runs (
    pk integer NOT NULL,
    project_id integer NOT NULL,
    run_id character varying(128) NOT NULL,
    name character varying(256),
    job_type character varying(128),
    config json NOT NULL,
    state character varying(16) NOT NULL,
    created_at timestamp with time zone NOT NULL
);


--
-- Name: runs_pk_seq; Type: SEQUENCE; Schema: public; Owner: -
--

CREATE SEQUENCE public.runs_pk_seq
    AS integer
    START WITH 1
    INCREMENT BY 1
    NO MINVALUE
    NO MAXVALUE
    CACHE 1;


--
-- Name: runs_pk_seq; Type: SEQUENCE OWNED BY; Schema: public; Owner: -
--

ALTER SEQUENCE public.runs_pk_seq OWNED BY public.runs.pk;


--
-- Name: usages; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.usages (
    run_pk integer NOT NULL,
    version_id character varying(32) NOT NULL,
    use_as character varying(128)
);


--
-- Name: version_tags; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.version_tags (
    version_id character varying(32) NOT NULL,
    tag character varying(128) NOT NULL
);


--
-- Name: versions; Type: TABLE; Schema: public; Owner: -
--

CREATE TABLE public.versions (
    id character varying(32) NOT NULL,
    collection_id integer NOT NULL,
    idx integer NOT NULL,
    digest character varying(64) NOT NULL,
    manifest_md5 character varying(32) NOT NULL,
    size bigint NOT NULL,
    file_count bigint NOT NULL,
    description text,
    meta json NOT NULL,
    created_at timestamp with time zone NOT NULL,
    updated_at timestamp with time zone NOT NULL,
    ttl_seconds double precision,
    state character varying(16) NOT NULL,
    run_pk integer,
    source_id character varying(32)
);


--
-- Name: collections id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.collections ALTER COLUMN id SET DEFAULT nextval('public.collections_id_seq'::regclass);


--
-- Name: entities id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.entities ALTER COLUMN id SET DEFAULT nextval('public.entities_id_seq'::regclass);


--
-- Name: projects id; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.projects ALTER COLUMN id SET DEFAULT nextval('public.projects_id_seq'::regclass);


--
-- Name: runs pk; Type: DEFAULT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.runs ALTER COLUMN pk SET DEFAULT nextval('public.runs_pk_seq'::regclass);


--
-- Data for Name: aliases; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.aliases VALUES (1, 'best', '861aa930d2694a64941b371742d6a921');
INSERT INTO public.aliases VALUES (1, 'latest', '78b000c1627c477da37d2527d5703b3a');
INSERT INTO public.aliases VALUES (3, 'latest', 'b6295be2d88b44cd8125dcd27b66f3ff');


--
-- Data for Name: blob_blockmaps; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: blobs; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.blobs VALUES (1, '2c1743a391305fbf367df8e4f069f9f9', 5, '2026-12-02 06:26:14.560404+00');
INSERT INTO public.blobs VALUES (1, 'a63c90cc3684ad8b0a2176a6a8fe9005', 10, '2026-12-02 06:26:14.576985+00');
INSERT INTO public.blobs VALUES (1, '933dd710f56628d9dc2d22443a2f74b8', 246, '2026-12-02 06:26:14.583764+00');
INSERT INTO public.blobs VALUES (1, 'e155e9e3166af131136a8fcb84eb9462', 6, '2026-12-02 06:26:14.616796+00');
INSERT INTO public.blobs VALUES (1, 'c4dcdbcb4470a9f3259420f131185648', 183, '2026-12-02 06:26:14.619402+00');
INSERT INTO public.blobs VALUES (1, '9dd4e461268c8034f5c8564e155c67a6', 1, '2026-12-02 06:26:14.634879+00');
INSERT INTO public.blobs VALUES (1, '8f05bb6dc249479018dbc1172fba3365', 179, '2026-12-02 06:26:14.638114+00');


--
-- Data for Name: collection_tags; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: collections; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.collections VALUES (1, 1, 'ds', 'dataset', NULL, '2026-12-02 06:26:14.591076+00', 2, 'sequence');
INSERT INTO public.collections VALUES (3, 1, 'model', 'model', NULL, '2026-12-02 06:26:14.640848+00', 1, 'sequence');


--
-- Data for Name: entities; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.entities VALUES (1, 'ent', '2026-12-02 06:26:14.560999+00', NULL);


--
-- Data for Name: projects; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.projects VALUES (1, 1, 'proj', '2026-12-02 06:26:14.592357+00');


--
-- Data for Name: runs; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: usages; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: version_tags; Type: TABLE DATA; Schema: public; Owner: -
--



--
-- Data for Name: versions; Type: TABLE DATA; Schema: public; Owner: -
--

INSERT INTO public.versions VALUES ('861aa930d2694a64941b371742d6a921', 1, 0, '33c5795db849e9309ba6de3d792494ae', '933dd710f56628d9dc2d22443a2f74b8', 15, 2, NULL, '{}', '2026-12-02 06:26:14.591076+00', '2026-12-02 06:26:14.591076+00', NULL, 'COMMITTED', NULL, NULL);
INSERT INTO public.versions VALUES ('78b000c1627c477da37d2527d5703b3a', 1, 1, '38fca8aa26261b55bf2b9a3c5e7ba3d6', 'c4dcdbcb4470a9f3259420f131185648', 6, 1, 'second', '{}', '2026-12-02 06:26:14.623021+00', '2026-12-02 06:26:14.623021+00', NULL, 'COMMITTED', NULL, NULL);
INSERT INTO public.versions VALUES ('b6295be2d88b44cd8125dcd27b66f3ff', 3, 0, 'd156a6d236e55cd4cf55bab99f190502', '8f05bb6dc249479018dbc1172fba3365', 1, 1, NULL, '{}', '2026-12-02 06:26:14.640848+00', '2026-12-02 06:26:14.640848+00', NULL, 'COMMITTED', NULL, NULL);


--
-- Name: collections_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.collections_id_seq', 3, true);


--
-- Name: entities_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.entities_id_seq', 10, true);


--
-- Name: projects_id_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.projects_id_seq', 3, true);


--
-- Name: runs_pk_seq; Type: SEQUENCE SET; Schema: public; Owner: -
--

SELECT pg_catalog.setval('public.runs_pk_seq', 1, false);


--
-- Name: aliases aliases_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.aliases
    ADD CONSTRAINT aliases_pkey PRIMARY KEY (collection_id, alias);


--
-- Name: blob_blockmaps blob_blockmaps_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.blob_blockmaps
    ADD CONSTRAINT blob_blockmaps_pkey PRIMARY KEY (entity_id, md5);


--
-- Name: blobs blobs_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.blobs
    ADD CONSTRAINT blobs_pkey PRIMARY KEY (entity_id, md5);


--
-- Name: collection_tags collection_tags_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.collection_tags
    ADD CONSTRAINT collection_tags_pkey PRIMARY KEY (collection_id, tag);


--
-- Name: collections collections_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.collections
    ADD CONSTRAINT collections_pkey PRIMARY KEY (id);


--
-- Name: collections collections_project_id_name_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.collections
    ADD CONSTRAINT collections_project_id_name_key UNIQUE (project_id, name);


--
-- Name: entities entities_name_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.entities
    ADD CONSTRAINT entities_name_key UNIQUE (name);


--
-- Name: entities entities_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.entities
    ADD CONSTRAINT entities_pkey PRIMARY KEY (id);


--
-- Name: projects projects_entity_id_name_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.projects
    ADD CONSTRAINT projects_entity_id_name_key UNIQUE (entity_id, name);


--
-- Name: projects projects_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.projects
    ADD CONSTRAINT projects_pkey PRIMARY KEY (id);


--
-- Name: runs runs_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.runs
    ADD CONSTRAINT runs_pkey PRIMARY KEY (pk);


--
-- Name: runs runs_project_id_run_id_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.runs
    ADD CONSTRAINT runs_project_id_run_id_key UNIQUE (project_id, run_id);


--
-- Name: usages usages_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.usages
    ADD CONSTRAINT usages_pkey PRIMARY KEY (run_pk, version_id);


--
-- Name: version_tags version_tags_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.version_tags
    ADD CONSTRAINT version_tags_pkey PRIMARY KEY (version_id, tag);


--
-- Name: versions versions_collection_id_idx_key; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.versions
    ADD CONSTRAINT versions_collection_id_idx_key UNIQUE (collection_id, idx);


--
-- Name: versions versions_pkey; Type: CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.versions
    ADD CONSTRAINT versions_pkey PRIMARY KEY (id);


--
-- Name: aliases_by_version; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX aliases_by_version ON public.aliases USING btree (version_id);


--
-- Name: usages_by_version; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX usages_by_version ON public.usages USING btree (version_id);


--
-- Name: versions_by_run; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX versions_by_run ON public.versions USING btree (run_pk);


--
-- Name: versions_by_source; Type: INDEX; Schema: public; Owner: -
--

CREATE INDEX versions_by_source ON public.versions USING btree (source_id);


--
-- Name: aliases aliases_collection_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.aliases
    ADD CONSTRAINT aliases_collection_id_fkey FOREIGN KEY (collection_id) REFERENCES public.collections(id) ON DELETE CASCADE;


--
-- Name: aliases aliases_version_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.aliases
    ADD CONSTRAINT aliases_version_id_fkey FOREIGN KEY (version_id) REFERENCES public.versions(id) ON DELETE CASCADE;


--
-- Name: blob_blockmaps blob_blockmaps_entity_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.blob_blockmaps
    ADD CONSTRAINT blob_blockmaps_entity_id_fkey FOREIGN KEY (entity_id) REFERENCES public.entities(id) ON DELETE CASCADE;


--
-- Name: blobs blobs_entity_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.blobs
    ADD CONSTRAINT blobs_entity_id_fkey FOREIGN KEY (entity_id) REFERENCES public.entities(id) ON DELETE CASCADE;


--
-- Name: collection_tags collection_tags_collection_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.collection_tags
    ADD CONSTRAINT collection_tags_collection_id_fkey FOREIGN KEY (collection_id) REFERENCES public.collections(id) ON DELETE CASCADE;


--
-- Name: collections collections_project_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.collections
    ADD CONSTRAINT collections_project_id_fkey FOREIGN KEY (project_id) REFERENCES public.projects(id) ON DELETE CASCADE;


--
-- Name: projects projects_entity_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.projects
    ADD CONSTRAINT projects_entity_id_fkey FOREIGN KEY (entity_id) REFERENCES public.entities(id) ON DELETE CASCADE;


--
-- Name: runs runs_project_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.runs
    ADD CONSTRAINT runs_project_id_fkey FOREIGN KEY (project_id) REFERENCES public.projects(id) ON DELETE CASCADE;


--
-- Name: usages usages_run_pk_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.usages
    ADD CONSTRAINT usages_run_pk_fkey FOREIGN KEY (run_pk) REFERENCES public.runs(pk) ON DELETE CASCADE;


--
-- Name: usages usages_version_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.usages
    ADD CONSTRAINT usages_version_id_fkey FOREIGN KEY (version_id) REFERENCES public.versions(id) ON DELETE CASCADE;


--
-- Name: version_tags version_tags_version_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.version_tags
    ADD CONSTRAINT version_tags_version_id_fkey FOREIGN KEY (version_id) REFERENCES public.versions(id) ON DELETE CASCADE;


--
-- Name: versions versions_collection_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.versions
    ADD CONSTRAINT versions_collection_id_fkey FOREIGN KEY (collection_id) REFERENCES public.collections(id) ON DELETE CASCADE;


--
-- Name: versions versions_run_pk_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.versions
    ADD CONSTRAINT versions_run_pk_fkey FOREIGN KEY (run_pk) REFERENCES public.runs(pk) ON DELETE SET NULL;


--
-- Name: versions versions_source_id_fkey; Type: FK CONSTRAINT; Schema: public; Owner: -
--

ALTER TABLE ONLY public.versions
    ADD CONSTRAINT versions_source_id_fkey FOREIGN KEY (source_id) REFERENCES public.versions(id) ON DELETE CASCADE;


--
-- PostgreSQL database dump complete
--


