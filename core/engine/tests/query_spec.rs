//! The query examples of the hub spec (§9.4 and around) against a small fleet of twins.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{json, Value};
use zerotouch_engine::error::Error;
use zerotouch_engine::query::{
    execute, parse, parse_condition, Collection, CompareOp, Expr, ItemType, Literal, Path, QueryPage,
    VecSource, MAX_QUERY_LEN,
};
use zerotouch_engine::store::PageRequest;

/// A device twin in the REST shape of spec §5.1.
fn twin(
    id: &str,
    state: (&str, &str),
    last: &str,
    edge: bool,
    tags: Value,
    reported: Value,
    desired: Value,
) -> Value {
    json!({
        "deviceId": id,
        "etag": "AAAAAAAAAAE=",
        "deviceEtag": "NTgwMDg5MDAz",
        "status": state.0,
        "statusUpdateTime": "0001-01-01T00:00:00Z",
        "connectionState": state.1,
        "lastActivityTime": last,
        "cloudToDeviceMessageCount": 0,
        "authenticationType": "sas",
        "x509Thumbprint": {"primaryThumbprint": null, "secondaryThumbprint": null},
        "modelId": "",
        "version": 2,
        "tags": tags,
        "properties": {
            "desired": desired,
            "reported": reported,
        },
        "capabilities": {"iotEdge": edge},
        "deviceScope": null,
        "parentScopes": []
    })
}

fn reported(freq: Option<i64>, status: &str, extra: Value) -> Value {
    let mut r = json!({"telemetryConfig": {"status": status}, "$version": 4});
    if let Some(f) = freq {
        r["telemetryConfig"]["sendFrequencyInSecs"] = json!(f);
    }
    if let Value::Object(m) = extra {
        for (k, v) in m {
            r[k] = v;
        }
    }
    r
}

fn fleet() -> Vec<Value> {
    vec![
        twin(
            "sensor-001",
            ("enabled", "Connected"),
            "2021-06-01T10:00:00Z",
            false,
            json!({"location": {"region": "US"}, "group": {"name": "line-3"}, "zones": ["a", "b"], "probe": {"kind": "temp"}}),
            reported(
                Some(60),
                "Success",
                json!({"connectivity": "wired", "config": "v2",
                "sensors": [{"kind": "temp", "unit": "C"}, {"kind": "hum"}]}),
            ),
            json!({"config": "v2", "$version": 2}),
        ),
        twin(
            "sensor-002",
            ("enabled", "Connected"),
            "2021-04-01T10:00:00Z",
            false,
            json!({"location": {"region": "US"}, "group": {"name": "line-4"}, "zones": ["b"]}),
            reported(Some(30), "Success", json!({"connectivity": "wifi", "config": "v1"})),
            json!({"config": "v2", "$version": 3}),
        ),
        twin(
            "sensor-003",
            ("disabled", "Disconnected"),
            "2020-12-31T23:59:59Z",
            false,
            json!({"location": {"region": "EU"}}),
            reported(Some(120), "Success", json!({"connectivity": null})),
            json!({"$version": 1}),
        ),
        twin(
            "gateway-01",
            ("enabled", "Connected"),
            "2021-06-02T08:00:00Z",
            true,
            json!({"location": {"region": "US"}, "group": {"name": "line-3"}}),
            reported(Some(300), "Pending", json!({"connectivity": "cellular", "config": {"a": 1}})),
            json!({"config": {"a": 1}, "$version": 5}),
        ),
        twin(
            "AZ3166Device",
            ("enabled", "Disconnected"),
            "2021-05-07T00:50:38.0543092Z",
            false,
            json!({"location": {"region": "EU"}}),
            reported(None, "Pending", json!({"connectivity": "wifi", "config": "v1"})),
            json!({"config": "v1", "$version": 2}),
        ),
        twin(
            "dev1",
            ("enabled", "Connected"),
            "2021-03-03T03:03:03Z",
            false,
            json!({"location": {"region": "APAC"}}),
            reported(Some(15), "Error", json!({"config": 3})),
            json!({"config": 3, "$version": 2}),
        ),
    ]
}

fn modules() -> Vec<Value> {
    let m = |dev: &str, module: &str, status: &str| {
        json!({"deviceId": dev, "moduleId": module, "etag": "AAAAAAAAAAE=", "status": "enabled",
               "connectionState": "Disconnected", "version": 2,
               "properties": {"desired": {"$version": 1}, "reported": {"status": status, "$version": 2}}})
    };
    vec![
        m("device1", "scanner", "scanning"),
        m("device2", "scanner", "scanning"),
        m("device2", "uploader", "idle"),
        m("device3", "scanner", "scanning"),
    ]
}

fn jobs() -> Vec<Value> {
    let j = |dev: &str, job: &str, kind: &str, status: &str, created: &str| {
        json!({"deviceId": dev, "jobId": job, "jobType": kind, "status": status,
               "startTimeUtc": "2016-09-29T18:18:52.7418462", "endTimeUtc": "2016-09-29T18:20:52.7418462",
               "createdDateTimeUtc": created, "lastUpdatedDateTimeUtc": "2016-09-29T18:18:56.8894408Z",
               "outcome": {"deviceMethodResponse": null}})
    };
    vec![
        j("myDeviceId", "myJobId", "scheduleUpdateTwin", "completed", "2016-09-29T18:18:56.7787107Z"),
        j("myDeviceId", "oldJob", "scheduleUpdateTwin", "completed", "2016-08-01T00:00:00Z"),
        j("otherDevice", "myJobId", "scheduleUpdateTwin", "completed", "2016-09-29T18:18:57Z"),
        j("myDeviceId", "methodJob", "scheduleDeviceMethod", "failed", "2016-09-30T00:00:00Z"),
    ]
}

fn source() -> VecSource {
    VecSource { devices: fleet(), modules: modules(), jobs: jobs() }
}

fn page(query: &str, max_items: usize, continuation: Option<String>) -> QueryPage {
    let q = parse(query).unwrap_or_else(|e| panic!("{query}: {e}"));
    execute(&q, &source(), &PageRequest { continuation, max_items }).unwrap()
}

/// Runs a query to its last page and returns every item.
fn run(query: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut token = None;
    loop {
        let p = page(query, 100, token);
        items.extend(p.items);
        match p.continuation {
            Some(t) => token = Some(t),
            None => return items,
        }
    }
}

fn ids(items: &[Value]) -> Vec<&str> {
    items.iter().map(|i| i["deviceId"].as_str().unwrap()).collect()
}

#[test]
fn select_star_returns_every_device_twin_whole() {
    let p = page("SELECT * FROM devices", 100, None);
    assert_eq!(p.item_type, ItemType::Twin);
    assert_eq!(p.item_type.as_str(), "twin");
    assert_eq!(p.items, fleet());
    assert_eq!(p.continuation, None);
}

#[test]
fn counting_all_devices_returns_one_raw_row_under_the_alias() {
    let p = page("SELECT COUNT() AS totalNumberOfDevices FROM devices", 100, None);
    assert_eq!(p.item_type, ItemType::Raw);
    assert_eq!(p.items, vec![json!({"totalNumberOfDevices": 6})]);
}

#[test]
fn filtering_on_a_tag_matches_the_exact_value() {
    let items = run("SELECT * FROM devices WHERE tags.location.region = 'US'");
    assert_eq!(ids(&items), ["sensor-001", "sensor-002", "gateway-01"]);
}

#[test]
fn numeric_comparison_excludes_devices_lacking_the_property() {
    let items = run("SELECT * FROM devices WHERE tags.location.region = 'EU' AND \
         properties.reported.telemetryConfig.sendFrequencyInSecs >= 60");
    // AZ3166Device is in EU but reports no sendFrequencyInSecs.
    assert_eq!(ids(&items), ["sensor-003"]);
}

#[test]
fn in_list_matches_any_of_the_primitives() {
    let items = run("SELECT * FROM devices WHERE properties.reported.connectivity IN ['wired', 'wifi']");
    assert_eq!(ids(&items), ["sensor-001", "sensor-002", "AZ3166Device"]);
}

#[test]
fn nin_list_excludes_the_listed_device_ids() {
    let items = run("SELECT * FROM devices WHERE deviceId NIN ['dev1', 'dev2']");
    assert_eq!(ids(&items), ["sensor-001", "sensor-002", "sensor-003", "gateway-01", "AZ3166Device"]);
}

#[test]
fn is_defined_is_true_for_a_property_set_to_null() {
    let items = run("SELECT * FROM devices WHERE is_defined(properties.reported.connectivity)");
    // sensor-003 reports connectivity = null; dev1 does not report it at all.
    assert_eq!(ids(&items), ["sensor-001", "sensor-002", "sensor-003", "gateway-01", "AZ3166Device"]);
    let undefined = run("SELECT * FROM devices WHERE NOT IS_DEFINED(properties.reported.connectivity)");
    assert_eq!(ids(&undefined), ["dev1"]);
}

#[test]
fn group_by_reported_status_counts_devices_per_value() {
    let p = page(
        "SELECT properties.reported.telemetryConfig.status AS status, COUNT() AS numberOfDevices \
         FROM devices GROUP BY properties.reported.telemetryConfig.status",
        100,
        None,
    );
    assert_eq!(p.item_type, ItemType::Raw);
    assert_eq!(
        p.items,
        vec![
            json!({"numberOfDevices": 3, "status": "Success"}),
            json!({"numberOfDevices": 2, "status": "Pending"}),
            json!({"numberOfDevices": 1, "status": "Error"}),
        ]
    );
}

#[test]
fn projection_normalises_property_names_to_the_documents_spelling() {
    let p = page(
        "SELECT DeviceId, LastActivityTime FROM devices WHERE status = 'enabled' AND connectionState = 'Disconnected'",
        100,
        None,
    );
    assert_eq!(p.item_type, ItemType::Raw);
    assert_eq!(
        p.items,
        vec![json!({"deviceId": "AZ3166Device", "lastActivityTime": "2021-05-07T00:50:38.0543092Z"})]
    );
    let keys: Vec<&String> = p.items[0].as_object().unwrap().keys().collect();
    assert_eq!(keys, ["deviceId", "lastActivityTime"]);
}

#[test]
fn module_query_returns_module_twins_of_the_listed_devices() {
    let p = page(
        "SELECT * FROM devices.modules WHERE properties.reported.status = 'scanning' AND deviceId IN ['device1','device2']",
        100,
        None,
    );
    assert_eq!(p.item_type, ItemType::Twin);
    let found: Vec<(&str, &str)> =
        p.items.iter().map(|m| (m["deviceId"].as_str().unwrap(), m["moduleId"].as_str().unwrap())).collect();
    assert_eq!(found, [("device1", "scanner"), ("device2", "scanner")]);
}

#[test]
fn device_job_query_compares_dates_as_strings() {
    let p = page(
        "SELECT * FROM devices.jobs WHERE devices.jobs.deviceId = 'myDeviceId' AND \
         devices.jobs.jobType = 'scheduleUpdateTwin' AND devices.jobs.status = 'completed' AND \
         devices.jobs.createdDateTimeUtc > '2016-09-01'",
        100,
        None,
    );
    assert_eq!(p.item_type, ItemType::DeviceJob);
    assert_eq!(p.item_type.as_str(), "deviceJob");
    assert_eq!(p.items, vec![jobs()[0].clone()]);
}

#[test]
fn device_job_query_on_a_field_records_lack_matches_nothing() {
    // The docs' example names `createdTimeUtc`, which job records do not carry (§8.4): undefined.
    let items = run("SELECT * FROM devices.jobs WHERE devices.jobs.createdTimeUtc > '2016-09-01'");
    assert!(items.is_empty());
    assert_eq!(run("SELECT * FROM devices.jobs").len(), 4);
}

#[test]
fn job_id_query_lists_the_per_device_outcomes_of_one_job() {
    let items = run("SELECT * FROM devices.jobs WHERE devices.jobs.jobId = 'myJobId'");
    assert_eq!(ids(&items), ["myDeviceId", "otherDevice"]);
    // The unqualified form is accepted as well.
    assert_eq!(run("SELECT * FROM devices.jobs WHERE jobId = 'myJobId'"), items);
}

#[test]
fn startswith_selects_devices_by_id_prefix_case_sensitively() {
    let items = run("SELECT * FROM devices WHERE STARTSWITH(deviceId, 'sensor-')");
    assert_eq!(ids(&items), ["sensor-001", "sensor-002", "sensor-003"]);
    assert!(run("SELECT * FROM devices WHERE STARTSWITH(deviceId, 'SENSOR-')").is_empty());
}

#[test]
fn edge_enabled_devices_are_found_by_capability() {
    let items = run("SELECT * FROM devices WHERE capabilities.iotEdge = true");
    assert_eq!(ids(&items), ["gateway-01"]);
}

#[test]
fn escaped_keyword_names_a_tag_called_group() {
    let items = run("SELECT * FROM devices WHERE tags.[[group]].name = 'line-3'");
    assert_eq!(ids(&items), ["sensor-001", "gateway-01"]);
    let items = run("SELECT deviceId FROM devices WHERE [[tags]].[[group]].[[name]] = 'line-4'");
    assert_eq!(items, vec![json!({"deviceId": "sensor-002"})]);
}

#[test]
fn top_with_property_to_property_comparison_only_matches_primitives() {
    let p = page(
        "SELECT TOP 5 deviceId FROM devices WHERE properties.desired.config = properties.reported.config",
        100,
        None,
    );
    // gateway-01 has equal objects, which do not compare; sensor-003 has neither.
    assert_eq!(
        p.items,
        vec![
            json!({"deviceId": "sensor-001"}),
            json!({"deviceId": "AZ3166Device"}),
            json!({"deviceId": "dev1"})
        ]
    );
    let p = page(
        "SELECT TOP 2 deviceId FROM devices WHERE properties.desired.config = properties.reported.config",
        100,
        None,
    );
    assert_eq!(p.items, vec![json!({"deviceId": "sensor-001"}), json!({"deviceId": "AZ3166Device"})]);
    assert_eq!(p.continuation, None);
}

#[test]
fn job_query_conditions_select_the_target_devices() {
    let fleet = fleet();
    let targets = |cond: &str| -> Vec<String> {
        let e = parse_condition(cond).unwrap();
        fleet
            .iter()
            .filter(|d| zerotouch_engine::query::matches(&e, d))
            .map(|d| d["deviceId"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(targets("deviceId = 'dev1'"), ["dev1"]);
    assert_eq!(targets("deviceId IN ['dev1','sensor-002']"), ["sensor-002", "dev1"]);
    assert_eq!(targets("tags.location.region = 'APAC'"), ["dev1"]);
    assert_eq!(targets("devices.tags.location.region = 'APAC'"), ["dev1"]);
}

#[test]
fn values_are_case_sensitive() {
    assert!(run("SELECT * FROM devices WHERE connectionState = 'connected'").is_empty());
    assert!(run("SELECT * FROM devices.jobs WHERE devices.jobs.status = 'Completed'").is_empty());
    assert_eq!(run("SELECT * FROM devices.jobs WHERE devices.jobs.status = 'completed'").len(), 3);
}

#[test]
fn property_names_and_keywords_are_case_insensitive() {
    let items =
        run("select * from DEVICES where TAGS.Location.REGION = 'EU' and ConnectionState = 'Disconnected'");
    assert_eq!(ids(&items), ["sensor-003", "AZ3166Device"]);
}

#[test]
fn not_equal_on_a_missing_property_is_not_true() {
    assert!(run("SELECT * FROM devices WHERE properties.reported.firmware != '1.0'").is_empty());
    assert!(run("SELECT * FROM devices WHERE NOT (properties.reported.firmware = '1.0')").is_empty());
    assert!(run("SELECT * FROM devices WHERE properties.reported.firmware NIN ['1.0']").is_empty());
}

#[test]
fn or_with_an_undefined_side_still_passes_when_the_other_is_true() {
    let items = run("SELECT * FROM devices WHERE properties.reported.firmware = '1.0' OR deviceId = 'dev1'");
    assert_eq!(ids(&items), ["dev1"]);
}

#[test]
fn comparing_values_of_different_types_matches_nothing() {
    assert!(run("SELECT * FROM devices WHERE deviceId > 5").is_empty());
    assert!(run("SELECT * FROM devices WHERE version = '2'").is_empty());
    assert_eq!(run("SELECT * FROM devices WHERE version = 2").len(), 6);
    assert_eq!(run("SELECT * FROM devices WHERE version = 2.0").len(), 6);
}

#[test]
fn null_matches_only_null() {
    let items = run("SELECT * FROM devices WHERE properties.reported.connectivity = null");
    assert_eq!(ids(&items), ["sensor-003"]);
    assert_eq!(run("SELECT * FROM devices WHERE deviceScope = null").len(), 6);
}

#[test]
fn arithmetic_in_conditions_and_projections() {
    let items =
        run("SELECT * FROM devices WHERE properties.reported.telemetryConfig.sendFrequencyInSecs * 2 >= 240");
    assert_eq!(ids(&items), ["sensor-003", "gateway-01"]);
    let items =
        run("SELECT * FROM devices WHERE properties.reported.telemetryConfig.sendFrequencyInSecs % 60 = 0");
    assert_eq!(ids(&items), ["sensor-001", "sensor-003", "gateway-01"]);
    let items = run(
        "SELECT deviceId, properties.reported.telemetryConfig.sendFrequencyInSecs / 60 AS minutes, \
         (1 + 2) * -3 AS constant FROM devices WHERE deviceId IN ['sensor-001', 'sensor-002', 'AZ3166Device']",
    );
    assert_eq!(
        items,
        vec![
            json!({"deviceId": "sensor-001", "minutes": 1, "constant": -9}),
            json!({"deviceId": "sensor-002", "minutes": 0.5, "constant": -9}),
            json!({"deviceId": "AZ3166Device", "constant": -9}),
        ]
    );
}

#[test]
fn type_checking_functions_classify_properties() {
    let q = |f: &str, path: &str| ids(&run(&format!("SELECT * FROM devices WHERE {f}({path})"))).join(",");
    assert_eq!(q("IS_NULL", "properties.reported.connectivity"), "sensor-003");
    assert_eq!(q("IS_STRING", "properties.reported.config"), "sensor-001,sensor-002,AZ3166Device");
    assert_eq!(q("IS_NUMBER", "properties.reported.config"), "dev1");
    assert_eq!(q("IS_OBJECT", "properties.reported.config"), "gateway-01");
    assert_eq!(q("IS_ARRAY", "tags.zones"), "sensor-001,sensor-002");
    assert_eq!(q("IS_BOOL", "capabilities.iotEdge").split(',').count(), 6);
    assert_eq!(q("IS_PRIMITIVE", "properties.reported.config"), "sensor-001,sensor-002,AZ3166Device,dev1");
    assert_eq!(q("is_primitive", "properties.reported.nothing"), "");
}

#[test]
fn endswith_matches_suffixes() {
    let items = run("SELECT * FROM devices WHERE ENDSWITH(deviceId, '-01') OR endswith(deviceId, 'Device')");
    assert_eq!(ids(&items), ["gateway-01", "AZ3166Device"]);
}

#[test]
fn array_contains_finds_values_and_partial_objects() {
    let items = run("SELECT * FROM devices WHERE ARRAY_CONTAINS(tags.zones, 'b')");
    assert_eq!(ids(&items), ["sensor-001", "sensor-002"]);
    assert_eq!(ids(&run("SELECT * FROM devices WHERE ARRAY_CONTAINS(tags.zones, 'a')")), ["sensor-001"]);
    // Objects match whole by default, by subset with the third argument.
    let partial =
        run("SELECT * FROM devices WHERE ARRAY_CONTAINS(properties.reported.sensors, tags.probe, true)");
    assert_eq!(ids(&partial), ["sensor-001"]);
    assert!(
        run("SELECT * FROM devices WHERE ARRAY_CONTAINS(properties.reported.sensors, tags.probe)").is_empty()
    );
    assert!(run("SELECT * FROM devices WHERE ARRAY_CONTAINS(properties.reported.sensors, 'temp')").is_empty());
    // Not an array: undefined, so NOT does not flip it to true.
    assert!(run("SELECT * FROM devices WHERE NOT ARRAY_CONTAINS(properties.desired.config, 1)").is_empty());
}

#[test]
fn collection_prefixed_paths_name_the_same_properties() {
    let items = run("SELECT devices.deviceId FROM devices WHERE devices.deviceId = 'dev1'");
    assert_eq!(items, vec![json!({"deviceId": "dev1"})]);
    let items = run("SELECT * FROM devices.modules WHERE devices.modules.moduleId = 'uploader'");
    assert_eq!(items.len(), 1);
}

#[test]
fn projection_without_alias_uses_the_last_segment_and_omits_missing_values() {
    let items =
        run("SELECT deviceId, properties.reported.telemetryConfig.status, properties.reported.connectivity \
         FROM devices WHERE deviceId IN ['sensor-003', 'dev1']");
    assert_eq!(
        items,
        vec![
            json!({"deviceId": "sensor-003", "status": "Success", "connectivity": null}),
            json!({"deviceId": "dev1", "status": "Error"}),
        ]
    );
}

#[test]
fn dates_compare_as_iso_text() {
    let items = run("SELECT deviceId FROM devices WHERE lastActivityTime >= '2021-05-01' AND lastActivityTime < '2021-06-02'");
    assert_eq!(items, vec![json!({"deviceId": "sensor-001"}), json!({"deviceId": "AZ3166Device"})]);
}

#[test]
fn double_quoted_strings_and_escapes_are_constants() {
    assert_eq!(ids(&run(r#"SELECT * FROM devices WHERE deviceId = "dev1""#)), ["dev1"]);
    assert_eq!(ids(&run(r"SELECT * FROM devices WHERE deviceId = '\u0064ev1'")), ["dev1"]);
    assert!(run(r"SELECT * FROM devices WHERE deviceId = 'it\'s'").is_empty());
    assert_eq!(ids(&run("SELECT * FROM devices WHERE version = 0x2")).len(), 6);
}

#[test]
fn count_with_a_condition_counts_matching_devices() {
    let p = page("SELECT COUNT() AS n FROM devices WHERE status = 'disabled'", 100, None);
    assert_eq!(p.items, vec![json!({"n": 1})]);
    let p = page("SELECT COUNT() FROM devices WHERE deviceId = 'nobody'", 100, None);
    assert_eq!(p.items, vec![json!({"$1": 0})]);
}

#[test]
fn sum_avg_min_max_aggregate_numeric_values_per_group() {
    let p = page(
        "SELECT tags.location.region AS region, COUNT() AS n, SUM(properties.reported.telemetryConfig.sendFrequencyInSecs) AS total, \
         MIN(properties.reported.telemetryConfig.sendFrequencyInSecs) AS fastest, \
         MAX(properties.reported.telemetryConfig.sendFrequencyInSecs) AS slowest, \
         AVG(properties.reported.telemetryConfig.sendFrequencyInSecs) AS mean \
         FROM devices GROUP BY tags.location.region",
        100,
        None,
    );
    assert_eq!(
        p.items,
        vec![
            json!({"region": "US", "n": 3, "total": 390, "fastest": 30, "slowest": 300, "mean": 130.0}),
            json!({"region": "EU", "n": 2, "total": 120, "fastest": 120, "slowest": 120, "mean": 120.0}),
            json!({"region": "APAC", "n": 1, "total": 15, "fastest": 15, "slowest": 15, "mean": 15.0}),
        ]
    );
}

#[test]
fn group_by_is_only_for_devices_and_device_jobs_take_only_select_star() {
    // Spec §9.3: GROUP BY only on devices; devices.jobs only SELECT *.
    let q = "SELECT deviceId, COUNT() AS modules FROM devices.modules GROUP BY deviceId";
    let e = parse_err(q);
    assert_eq!(e.offset, q.find("GROUP").unwrap());
    assert!(e.message.starts_with("GROUP BY is only supported on devices"), "{}", e.message);
    let e = parse_err(
        "SELECT properties.reported.s AS s, COUNT() AS n FROM devices.modules GROUP BY properties.reported.s",
    );
    assert!(e.message.starts_with("GROUP BY is only supported on devices"), "{}", e.message);
    let e = parse_err("SELECT deviceId FROM devices.jobs");
    assert_eq!(e.offset, 7);
    assert!(e.message.starts_with("devices.jobs only supports SELECT *"), "{}", e.message);
    assert!(parse_err("SELECT TOP 2 jobId, status FROM devices.jobs WHERE status = 'completed'")
        .message
        .starts_with("devices.jobs only supports SELECT *"));

    // What stays: aggregates over modules without GROUP BY, and SELECT * (with TOP) over jobs.
    assert_eq!(page("SELECT COUNT() AS n FROM devices.modules", 100, None).items, vec![json!({"n": 4})]);
    assert_eq!(run("SELECT TOP 2 * FROM devices.jobs").len(), 2);
}

#[test]
fn paging_walks_every_result_and_omits_the_token_on_the_last_page() {
    let q = "SELECT deviceId FROM devices WHERE status = 'enabled'";
    let first = page(q, 2, None);
    assert_eq!(first.items, vec![json!({"deviceId": "sensor-001"}), json!({"deviceId": "sensor-002"})]);
    let second = page(q, 2, first.continuation.clone());
    assert_eq!(second.items, vec![json!({"deviceId": "gateway-01"}), json!({"deviceId": "AZ3166Device"})]);
    let third = page(q, 2, second.continuation.clone());
    assert_eq!(third.items, vec![json!({"deviceId": "dev1"})]);
    assert_eq!(third.continuation, None);
}

#[test]
fn a_page_ending_on_the_last_result_has_no_token() {
    let p = page("SELECT * FROM devices WHERE tags.location.region = 'US'", 3, None);
    assert_eq!(p.items.len(), 3);
    assert_eq!(p.continuation, None, "no empty trailing page");
}

#[test]
fn top_caps_the_total_over_pages() {
    let q = "SELECT TOP 3 deviceId FROM devices";
    let first = page(q, 2, None);
    assert_eq!(first.items.len(), 2);
    let second = page(q, 2, first.continuation);
    assert_eq!(second.items, vec![json!({"deviceId": "sensor-003"})]);
    assert_eq!(second.continuation, None);
    assert!(page("SELECT TOP 0 * FROM devices", 10, None).items.is_empty());
}

#[test]
fn group_by_results_are_paged_too() {
    let q = "SELECT properties.reported.telemetryConfig.status AS s, COUNT() AS n FROM devices \
             GROUP BY properties.reported.telemetryConfig.status";
    let first = page(q, 2, None);
    assert_eq!(first.items.len(), 2);
    let second = page(q, 2, first.continuation);
    assert_eq!(second.items, vec![json!({"s": "Error", "n": 1})]);
    assert_eq!(second.continuation, None);
}

#[test]
fn paging_over_a_large_fleet_returns_each_device_once() {
    let devices: Vec<Value> = (0..1000)
        .map(|i| json!({"deviceId": format!("d{i:04}"), "properties": {"reported": {"n": i}}}))
        .collect();
    let src = VecSource::with_devices(devices);
    let q = parse("SELECT deviceId FROM devices WHERE properties.reported.n % 3 = 0").unwrap();
    let mut seen = Vec::new();
    let mut token = None;
    loop {
        let p = execute(&q, &src, &PageRequest { continuation: token, max_items: 100 }).unwrap();
        assert!(p.items.len() <= 100);
        seen.extend(p.items.into_iter().map(|v| v["deviceId"].as_str().unwrap().to_owned()));
        match p.continuation {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    let expected: Vec<String> = (0..1000).filter(|i| i % 3 == 0).map(|i| format!("d{i:04}")).collect();
    assert_eq!(seen, expected);
}

#[test]
fn a_token_replayed_with_another_query_is_refused() {
    let first = page("SELECT * FROM devices", 2, None);
    let other = parse("SELECT * FROM devices WHERE status = 'enabled'").unwrap();
    let err = execute(&other, &source(), &PageRequest { continuation: first.continuation, max_items: 2 })
        .unwrap_err();
    assert_eq!(err.to_wire().error_code, 400_004, "{err:?}");
    let q = parse("SELECT * FROM devices").unwrap();
    let garbage = PageRequest { continuation: Some("not a token".to_owned()), max_items: 2 };
    let err = execute(&q, &source(), &garbage).unwrap_err();
    assert_eq!(err.to_wire().error_code, 400_004, "{err:?}");
}

#[test]
fn the_where_clause_is_an_inspectable_tree() {
    let q = parse("SELECT * FROM devices WHERE devices.Status = 'enabled' AND tags.x IN [1, 2]").unwrap();
    assert_eq!(q.from, Collection::Devices);
    let Some(Expr::And(left, right)) = &q.filter else { panic!("{:?}", q.filter) };
    assert_eq!(
        **left,
        Expr::Compare(
            CompareOp::Eq,
            Box::new(Expr::Path(Path { segments: vec!["Status".to_owned()] })),
            Box::new(Expr::Literal(Literal::String("enabled".to_owned())))
        )
    );
    assert!(matches!(&**right, Expr::In { negated: false, list, .. } if list.len() == 2));
    let conjuncts = q.filter.as_ref().unwrap().conjuncts();
    assert_eq!(conjuncts, [&**left, &**right]);
}

// ---- parse errors ----

fn parse_err(query: &str) -> zerotouch_engine::query::ParseError {
    parse(query).expect_err(query)
}

#[test]
fn misspelled_collection_reports_what_was_expected_and_where() {
    let e = parse_err("SELECT * FROM devics");
    assert_eq!((e.offset, e.line, e.column), (14, 1, 15));
    assert_eq!(e.message, "expected devices, devices.modules or devices.jobs after FROM, found 'devics'");
}

#[test]
fn error_positions_count_lines_and_columns() {
    let e = parse_err("SELECT *\nFROM devices\nWHERE deviceId = ");
    assert_eq!((e.offset, e.line, e.column), (39, 3, 18));
    assert!(e.message.contains("found the end of the query"), "{}", e.message);
    assert_eq!(e.to_string(), format!("{} (line 3, column 18)", e.message));
}

#[test]
fn underscore_spelling_of_startswith_is_rejected_with_a_hint() {
    let e = parse_err("SELECT * FROM devices WHERE STARTS_WITH(deviceId, 'a')");
    assert_eq!(e.offset, 28);
    assert_eq!(e.message, "unknown function 'STARTS_WITH' (did you mean STARTSWITH?)");
    let e = parse_err("SELECT * FROM devices WHERE CONTAINS(deviceId, 'a')");
    assert!(
        e.message.starts_with("unknown function 'CONTAINS'; supported functions: IS_DEFINED"),
        "{}",
        e.message
    );
}

#[test]
fn unterminated_string_points_at_its_opening_quote() {
    let e = parse_err("SELECT * FROM devices WHERE deviceId = 'dev1");
    assert_eq!(e.offset, 39);
    assert_eq!(e.message, "unterminated string: missing closing '");
}

#[test]
fn reserved_word_as_property_suggests_escaping() {
    let e = parse_err("SELECT * FROM devices WHERE group = 'a'");
    assert_eq!(e.offset, 28);
    assert!(e.message.contains("write [[group]]"), "{}", e.message);
}

#[test]
fn missing_from_and_stray_tokens_are_reported() {
    let e = parse_err("SELECT deviceId devices");
    assert_eq!(e.offset, 16);
    assert_eq!(e.message, "expected ',' or FROM after the select list, found 'devices'");
    let e = parse_err("SELECT * FROM devices WHERE a = 1 b = 2");
    assert_eq!(e.offset, 34);
    assert!(e.message.starts_with("expected AND, OR"), "{}", e.message);
    let e = parse_err("UPDATE devices");
    assert_eq!(
        (e.offset, e.message.as_str()),
        (0, "expected SELECT at the start of the query, found 'UPDATE'")
    );
    let e = parse_err("SELECT * FROM devices WHERE a && b");
    assert_eq!(e.offset, 30);
    assert_eq!(e.message, "unexpected character '&' (use AND / OR)");
}

#[test]
fn invalid_aggregate_shapes_are_rejected() {
    let e = parse_err("SELECT * FROM devices GROUP BY tags.x");
    assert!(e.message.starts_with("SELECT * cannot be used with GROUP BY"), "{}", e.message);
    let e = parse_err("SELECT deviceId, COUNT() FROM devices GROUP BY status");
    assert!(e.message.contains("only the grouped property 'status'"), "{}", e.message);
    let e = parse_err("SELECT COUNT() FROM devices.jobs");
    assert!(e.message.starts_with("devices.jobs does not support aggregates"), "{}", e.message);
    let e = parse_err("SELECT COUNT(deviceId) FROM devices");
    assert_eq!(e.message, "expected ')': COUNT() takes no argument, found 'deviceId'");
    let e = parse_err("SELECT * FROM devices WHERE IS_DEFINED()");
    assert_eq!(e.message, "IS_DEFINED takes 1 argument, found 0");
    let e = parse_err("SELECT * FROM devices WHERE deviceId IN 'a'");
    assert!(e.message.starts_with("expected a list of constants in brackets"), "{}", e.message);
}

#[test]
fn overlong_and_deeply_nested_queries_fail_cleanly() {
    let long = format!("SELECT * FROM devices WHERE deviceId = '{}'", "x".repeat(MAX_QUERY_LEN));
    let e = parse_err(&long);
    assert_eq!(e.offset, MAX_QUERY_LEN);
    assert!(e.message.contains("at most 8192"), "{}", e.message);
    let nested = format!("SELECT * FROM devices WHERE {}1{}", "(".repeat(2000), ")".repeat(2000));
    assert!(parse_err(&nested).message.contains("nested too deeply"));
    let nots = format!("SELECT * FROM devices WHERE {} true", "NOT ".repeat(1500));
    assert!(parse_err(&nots).message.contains("nested too deeply"));
}

#[test]
fn a_parse_error_is_a_bad_request_for_the_wire() {
    let err: Error = parse_err("SELECT FROM devices").into();
    let wire = err.to_wire();
    let msg = &wire.message;
    assert!(msg.starts_with("The query is invalid: expected"), "{msg}");
    assert!(msg.ends_with("(line 1, column 8)"), "{msg}");
    assert_eq!((wire.http_status, wire.error_code), (400, 400_006), "IotHubFormatError");
}

#[test]
fn a_keyword_where_a_value_belongs_is_named_in_the_error() {
    let e = parse_err("SELECT * FROM devices WHERE -NOT (deviceId = 'a')");
    assert_eq!(e.offset, 29);
    assert_eq!(e.message, "expected a property, a constant, a function call or '(', found 'NOT'");
}

#[test]
fn a_parsed_query_prints_as_canonical_text() {
    let q = parse(
        "select top 3 DeviceId as id, COUNT() from devices.jobs where devices.jobs.status in ['a', \"b\"] and not x > -1",
    );
    assert!(q.is_err(), "aggregates are refused on devices.jobs");
    let q =
        parse("select top 3 * from devices.jobs where devices.jobs.status in ['a', \"it's\"] and not x > -1")
            .unwrap();
    assert_eq!(
        q.to_string(),
        "SELECT TOP 3 * FROM devices.jobs WHERE ((status IN ['a', 'it\\'s']) AND (NOT (x > -1)))"
    );
    assert_eq!(parse(&q.to_string()).unwrap(), q);
    let q = parse("select top 3 DeviceId as id from devices where devices.status in ['a'] and not x > -1")
        .unwrap();
    assert_eq!(
        q.to_string(),
        "SELECT TOP 3 DeviceId AS id FROM devices WHERE ((status IN ['a']) AND (NOT (x > -1)))"
    );
    assert_eq!(parse(&q.to_string()).unwrap(), q);
}

#[test]
fn long_operator_chains_run_and_overlong_ones_are_refused() {
    let sum = format!("SELECT * FROM devices WHERE 1{} = 250", "+1".repeat(249));
    assert_eq!(run(&sum).len(), 6);
    let ors: Vec<String> = (0..250).map(|i| format!("deviceId = 'd{i}'")).collect();
    let q = format!("SELECT * FROM devices WHERE {} OR deviceId = 'dev1'", ors.join(" OR "));
    assert_eq!(ids(&run(&q)), ["dev1"]);
    let parsed = parse(&q).unwrap();
    assert_eq!(parse(&parsed.to_string()).unwrap(), parsed);

    let terms = (MAX_QUERY_LEN - 60) / 2;
    let e = parse_err(&format!("SELECT * FROM devices WHERE 1{} = {}", "+1".repeat(terms - 1), terms));
    assert_eq!(e.offset, 28);
    assert!(e.message.starts_with("expression too complex: more than 256 nested operators"), "{}", e.message);
    let e = parse_err(&format!("SELECT * FROM devices WHERE version = 2{}", " AND 1=1".repeat(1000)));
    assert!(e.message.contains("use IN ["), "{}", e.message);
}
