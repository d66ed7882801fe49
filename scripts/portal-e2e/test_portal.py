#!/usr/bin/env python3
# The portal in a real browser (issue 17): a real tenon-server on 127.0.0.1 with a temporary data
# dir, simulated agents, and headless Chromium driven through WebDriver (chromedriver) with Python
# selenium. Run by scripts/test-portal, which checks the prerequisites first.
#
# Why Python selenium and not the fantoccini crate: selenium talks to chromedriver without an
# async runtime or a second Cargo dependency tree for the workspace to build and audit, and its
# Keys/ActionChains make the keyboard-only checks (Tab, Enter, Space) short to write.
#
# Every page visited is saved as target/portal-screenshots/NN-name.png (a CI artifact) and
# checked with axe-core, injected from the pinned local copy (scripts/portal-e2e/node_modules,
# never a CDN); a `serious` or `critical` violation fails the page. The admin token is read from
# the data dir and typed into the sign-in field: it is never printed, put in a URL, a file name
# or a command line.
#
# Prints `portal stage: N passed, M failed` and exits non-zero when anything failed.

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.environ.get("TENON_BIN_DIR") or os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "debug")
SHOTS = os.path.join(ROOT, "target", "portal-screenshots")
AXE = os.path.join(ROOT, "scripts", "portal-e2e", "node_modules", "axe-core", "axe.min.js")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")

ANNA = "anna@contoso.com"
BEN = "ben@contoso.com"
# A group setting every device reaches through its primary user's group.
KEY = "Policies.SetCurrentUserAdministrator"

results = []  # (name, ok, detail)


def check(name):
    """Runs one named step; a failure is counted and reported, and later steps still run."""

    def wrap(f):
        def run(*args):
            try:
                f(*args)
                results.append((name, True, ""))
                print(f"ok   {name}", flush=True)
                return True
            except Exception as e:  # noqa: BLE001 - any failure of a step is that step's failure
                detail = "".join(traceback.format_exception_only(type(e), e)).strip()
                results.append((name, False, detail))
                print(f"FAIL {name}: {detail}", flush=True)
                return False

        return run

    return wrap


class Fleet:
    """A real server with users, settings and two enrolled simulated agents."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.data = os.path.join(tmp, "data")
        self.log = open(os.path.join(tmp, "server.log"), "wb")
        self.server = subprocess.Popen(
            [os.path.join(BIN, "tenon-server"), "serve", "--listen", "127.0.0.1:0", "--data-dir", self.data],
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        deadline = time.time() + 30
        self.url = None
        while time.time() < deadline:
            line = self.server.stdout.readline().decode(errors="replace")
            if not line:
                raise RuntimeError("tenon-server exited early; see its log")
            if line.startswith("tenon-server listening on "):
                self.url = line.split()[3]
                break
        if not self.url or not self.url.startswith("http://127.0.0.1:"):
            raise RuntimeError(f"unexpected server address {self.url!r}")
        self.token_file = os.path.join(self.data, "admin.token")
        self.agents = {}

    def ctl(self, *args):
        cmd = [os.path.join(BIN, "tenonctl"), "--server", self.url, "--token-file", self.token_file, *args]
        out = subprocess.run(cmd, capture_output=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"tenonctl {args[:2]} failed: {out.stderr.decode(errors='replace')[-500:]}")
        return out.stdout.decode()

    def agent(self, name, *args):
        state, device = self.agents[name]
        cmd = [os.path.join(BIN, "tenon-agent"), "--state-dir", state, "--platform", f"simulated:{device}", *args]
        out = subprocess.run(cmd, capture_output=True, timeout=60)
        if out.returncode != 0:
            raise RuntimeError(f"tenon-agent {args[:1]} failed: {out.stderr.decode(errors='replace')[-500:]}")
        return out.stdout.decode().strip()

    def populate(self):
        users = os.path.join(self.tmp, "users.json")
        with open(users, "w") as f:
            json.dump(
                [
                    {"userPrincipalName": ANNA, "id": "u-anna", "displayName": "Anna Adams", "groups": ["Engineering"]},
                    {"userPrincipalName": BEN, "id": "u-ben", "displayName": "Ben Brown", "groups": ["Sales"]},
                ],
                f,
            )
        self.ctl("users", "import", users)
        self.ctl("settings", "set", "--tenant", "Custom.Site", '"Berlin"')
        self.ctl("settings", "set", "--group", "Engineering", "Custom.Site", '"Munich"')
        # BitLocker on PC-ANNA (a TPM, not a VM): its recovery key is escrowed at its first syncs.
        self.ctl("settings", "set", "--tenant", "Policies.RequireSecurityFeatures.BitlockerEnabled", "true")
        # An available package for every device: installed only when asked (the device page's button).
        exe = os.path.join(self.tmp, "tool-setup.exe")
        with open(exe, "wb") as f:
            f.write(b"MZ fake installer")
        self.ctl("packages", "upload", exe, "--name", "Tool", "--version", "1", "--detect", r"file:C:\Tool\t.exe")
        self.ctl("packages", "assign", "Tool", "--tenant", "--intent", "available", "--wait")
        token_file = os.path.join(self.tmp, "enroll.token")
        with open(token_file, "w") as f:
            f.write(self.ctl("enroll-token", "create", "--uses", "2", "--ttl", "1h"))
        self.ids = {}
        for name, host, signed_in in [("a", "PC-ANNA", [ANNA]), ("b", "PC-OTHER", [])]:
            d = os.path.join(self.tmp, name)
            os.makedirs(d)
            device = os.path.join(d, "device.json")
            facts = {"hostname": host, "signed_in_users": signed_in}
            if host == "PC-ANNA":
                facts.update({
                    "tpm": {"present": True, "ready": True},
                    "vm": {"manufacturer": "Dell Inc.", "model": "Latitude 7440"},
                    "volumes": [{"mount": "C:", "encryption": "none", "protectors": []}],
                })
            with open(device, "w") as f:
                json.dump(facts, f)
            self.agents[name] = (os.path.join(d, "state"), device)
            self.ids[host] = self.agent(name, "enroll", "--server", self.url, "--token-file", token_file)
            self.agent(name, "sync", "--once")
            self.agent(name, "sync", "--once")

    def audit(self):
        return json.loads(self.ctl("--json", "audit", "list"))

    def stop(self):
        self.server.terminate()
        try:
            self.server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.server.kill()
        self.log.close()


def browser(profile):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
    ]:
        opts.add_argument(flag)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(30)
    d.set_script_timeout(30)
    return d


class Portal:
    """The browser with the checks every page gets: a screenshot and axe-core."""

    def __init__(self, driver, url):
        self.d = driver
        self.url = url
        self.n = 0
        with open(AXE) as f:
            self.axe = f.read()

    def go(self, path):
        self.d.get(self.url + path)

    def text(self):
        return self.d.find_element(By.TAG_NAME, "body").text

    def shot_and_axe(self, name):
        """Saves the whole page as a PNG and fails on serious or critical axe violations."""
        self.n += 1
        safe = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
        height = self.d.execute_script("return Math.max(document.body.scrollHeight, 600)")
        self.d.set_window_size(1280, min(int(height) + 140, 6000))
        self.d.save_screenshot(os.path.join(SHOTS, f"{self.n:02d}-{safe}.png"))
        self.d.set_window_size(1280, 900)
        self.d.execute_script(self.axe)
        found = self.d.execute_async_script(
            """
            const done = arguments[arguments.length - 1];
            axe.run(document, {resultTypes: ['violations']})
              .then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact, help: v.help,
                                                      nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 3)}))))
              .catch(e => done([{id: 'axe-error', impact: 'critical', help: String(e), nodes: []}]));
            """
        )
        bad = [v for v in found if v["impact"] in ("serious", "critical")]
        for v in found:
            if v not in bad:
                print(f"     axe ({v['impact']}) on {name}: {v['id']}: {v['help']}", flush=True)
        if bad:
            raise AssertionError(f"axe on {name}: " + "; ".join(f"{v['impact']} {v['id']} ({v['help']}) at {v['nodes']}" for v in bad))

    def tab_to(self, match, limit=60):
        """Presses Tab until the focused element satisfies `match`; keyboard only."""
        for _ in range(limit):
            ActionChains(self.d).send_keys(Keys.TAB).perform()
            el = self.d.switch_to.active_element
            if match(el):
                return el
        raise AssertionError("Tab never reached the element")

    def wait_for(self, cond, what, timeout=10):
        def ready(_driver):
            # The page may be mid-navigation when the condition reads it (a stale or missing
            # element): that is "not yet", not a failure.
            try:
                return cond()
            except WebDriverException:
                return False

        try:
            return WebDriverWait(self.d, timeout).until(ready)
        except Exception as e:
            raise AssertionError(f"timed out waiting for {what}; at {self.d.current_url}; page says: {self.text()[:1500]!r}") from e


def by_id(i):
    return lambda el: el.get_attribute("id") == i


def facts(p):
    """The device page's facts as a dict (dt -> dd)."""
    dts = p.d.find_elements(By.CSS_SELECTOR, "dl.facts dt")
    dds = p.d.find_elements(By.CSS_SELECTOR, "dl.facts dd")
    return {a.text: b.text for a, b in zip(dts, dds)}


def main():
    os.makedirs(SHOTS, exist_ok=True)
    for old in os.listdir(SHOTS):
        if old.endswith(".png"):
            os.remove(os.path.join(SHOTS, old))
    tmp = tempfile.mkdtemp(prefix="tenon-portal-e2e-")
    fleet = None
    driver = None
    try:
        fleet = Fleet(tmp)
        fleet.populate()
        driver = browser(os.path.join(tmp, "chromium-profile"))
        p = Portal(driver, fleet.url)
        device_id = fleet.ids["PC-ANNA"]
        state = {}

        @check("sign-in page: accessible, a wrong token is refused")
        def signin_page():
            p.go("/signin")
            p.shot_and_axe("signin")
            field = p.d.find_element(By.ID, "token")
            field.send_keys("not-a-token" + Keys.ENTER)
            p.wait_for(lambda: "not a valid admin token" in p.text(), "the refusal")
            p.shot_and_axe("signin-refused")

        @check("sign in with the admin token by keyboard alone")
        def signin():
            p.go("/signin")
            with open(fleet.token_file) as f:
                token = f.read().strip()
            field = p.tab_to(by_id("token"))
            field.send_keys(token)
            ActionChains(p.d).send_keys(Keys.ENTER).perform()
            p.wait_for(lambda: "Signed in as" in p.text(), "the overview")
            assert token not in p.d.page_source, "the token is not in the page"
            assert token not in p.d.current_url
            p.shot_and_axe("overview")

        @check("find a device by its user with the search, by keyboard alone")
        def search():
            p.go("/devices")
            p.shot_and_axe("devices")
            field = p.tab_to(by_id("q"))
            field.send_keys("anna")
            ActionChains(p.d).send_keys(Keys.ENTER).perform()
            p.wait_for(lambda: "PC-ANNA" in p.text() and "PC-OTHER" not in p.text(), "the search result")
            p.shot_and_axe("devices-search-anna")
            link = p.tab_to(lambda el: el.tag_name == "a" and el.text == "PC-ANNA")
            link.send_keys(Keys.ENTER)
            p.wait_for(lambda: p.d.current_url.endswith("/devices/" + device_id), "the device page")
            p.shot_and_axe("device")
            state["issued"] = int(facts(p)["Issued version"])

        def confirm_and_send():
            box = p.tab_to(lambda el: el.get_attribute("name") == "confirm")
            box.send_keys(Keys.SPACE)
            assert box.is_selected(), "Space ticks the confirmation box"
            p.tab_to(lambda el: el.tag_name == "button" and el.text == "Reassign primary user").send_keys(Keys.ENTER)

        @check("reassign the primary user by keyboard alone (a user who does not exist is refused)")
        def reassign():
            p.go("/devices/" + device_id)
            field = p.tab_to(by_id("upn"))
            field.send_keys("ghost@contoso.com")
            confirm_and_send()
            p.wait_for(lambda: p.d.find_elements(By.CSS_SELECTOR, "p.error[role=alert]"), "the refusal")
            assert p.d.find_element(By.ID, "upn").get_attribute("value") == "ghost@contoso.com", "typed value kept"
            p.shot_and_axe("device-reassign-refused")
            field = p.d.find_element(By.ID, "upn")
            field.clear()
            field.send_keys(BEN)
            confirm_and_send()
            p.wait_for(lambda: "The primary user was reassigned." in p.text(), "the confirmation")
            assert "Ben Brown (ben@contoso.com)" in p.text()
            p.shot_and_axe("device-reassigned")
            rows = [a for a in fleet.audit() if a.get("action") == "device.set_primary" and "bootstrap" in a.get("actor", "")]
            assert rows, "the reassignment is audited with the session's token name"

        @check("reveal the device's recovery key with a typed reason, by keyboard; find the audit row")
        def recovery_key():
            p.go("/devices/" + device_id)
            field = p.tab_to(by_id("reason"))
            field.send_keys("user locked out at boot (ticket 4711)")
            p.tab_to(lambda el: el.tag_name == "button" and el.text == "Reveal recovery keys").send_keys(Keys.ENTER)
            p.wait_for(lambda: p.d.find_elements(By.CSS_SELECTOR, "code.key"), "the revealed key")
            key = p.d.find_element(By.CSS_SELECTOR, "code.key").text
            assert re.fullmatch(r"\d{6}(-\d{6}){7}", key), "a 48-digit recovery password"
            assert "rotation requested" in p.text()
            assert key not in p.d.current_url
            p.shot_and_axe("recovery-keys")
            p.go("/audit?action=recovery_key.read")
            p.wait_for(lambda: "ticket 4711" in p.text(), "the audit row with the reason")
            assert key not in p.d.page_source, "the key is not in the audit log"
            p.shot_and_axe("audit-recovery-key")

        @check("install an available package on request from the device page, by keyboard; audited")
        def install():
            p.go("/devices/" + device_id)
            assert re.search(r"Tool\s+available\s+waiting", p.text()), "available: the device waits until asked"
            button = p.tab_to(lambda el: el.tag_name == "button" and el.get_attribute("aria-label") == "Install now: Tool")
            button.send_keys(Keys.ENTER)
            p.wait_for(lambda: "The install was requested" in p.text(), "the confirmation")
            p.shot_and_axe("device-install-requested")
            rows = [a for a in fleet.audit() if a.get("action") == "device.install" and "bootstrap" in a.get("actor", "")]
            assert rows and rows[0]["details"]["package"] == "Tool", "the request is audited with the session's token"
            fleet.agent("a", "sync", "--once")
            fleet.agent("a", "sync", "--once")
            p.go("/devices/" + device_id)
            p.wait_for(lambda: re.search(r"Tool\s+available\s+installed", p.text()), "the package installed after the agent synced")

        @check("users and groups pages: membership, source, origins of the effective configuration")
        def users_groups():
            p.go("/users")
            p.shot_and_axe("users")
            assert "Ben Brown" in p.text() and "file" in p.text()
            p.go("/users/anna%40contoso.com")
            p.shot_and_axe("user-anna")
            rows = {r.find_elements(By.TAG_NAME, "td")[0].text: r.text for r in p.d.find_elements(By.CSS_SELECTOR, "table tbody tr") if r.find_elements(By.TAG_NAME, "td")}
            assert "group Engineering" in rows.get("Custom.Site", ""), rows
            p.go("/groups")
            p.shot_and_axe("groups")
            p.go("/groups/Sales")
            p.shot_and_axe("group-sales")
            assert BEN in p.text() and ANNA not in p.text()

        @check("settings page by keyboard alone: bad JSON refused with the value kept, preview, save")
        def settings():
            p.go("/settings?scope=group:Sales")
            p.shot_and_axe("settings-sales")
            key = p.tab_to(by_id("key"))
            key.send_keys(KEY)
            value = p.tab_to(by_id("value"))
            value.send_keys("yes please")
            p.tab_to(by_id("preview-set"))
            ActionChains(p.d).send_keys(Keys.ENTER).perform()
            p.wait_for(lambda: "not JSON" in p.text(), "the refusal")
            assert p.d.find_element(By.ID, "value").get_attribute("value") == "yes please", "typed value kept"
            assert p.d.find_element(By.ID, "key").get_attribute("value") == KEY
            p.shot_and_axe("settings-bad-json")
            value = p.d.find_element(By.ID, "value")
            value.clear()
            value.send_keys("true")
            p.tab_to(by_id("preview-set"))
            ActionChains(p.d).send_keys(Keys.ENTER).perform()
            p.wait_for(lambda: p.d.find_elements(By.ID, "preview-count"), "the preview")
            assert p.d.find_element(By.ID, "preview-count").text == "1", p.text()
            assert "PC-ANNA" in p.text()
            p.shot_and_axe("settings-preview")
            p.tab_to(by_id("save"))
            ActionChains(p.d).send_keys(Keys.ENTER).perform()
            p.wait_for(lambda: "Saved: set " + KEY in p.text(), "the confirmation")
            p.shot_and_axe("settings-saved")
            assert any(a.get("action") == "settings.set" and "bootstrap" in a.get("actor", "") for a in fleet.audit())

        @check("signatures page: upload a template, preview it for a user in a sandboxed frame")
        def signatures():
            p.go("/signatures")
            p.shot_and_axe("signatures")
            p.d.find_element(By.ID, "sig-name").send_keys("Corp")
            p.d.find_element(By.ID, "sig-html").send_keys('<p style="color:#0b5cad"><b>{{Graph_User_DisplayName}}</b><br>{{Graph_User_JobTitle}}</p>')
            p.d.find_element(By.ID, "sig-groups").send_keys("Sales")
            p.d.find_element(By.ID, "upload-save").click()
            p.wait_for(lambda: "/signatures/Corp" in p.d.current_url, "the template's page")
            p.go("/signatures/Corp?user=ben%40contoso.com")
            p.d.switch_to.frame(p.d.find_element(By.CSS_SELECTOR, "iframe.signature-preview"))
            p.wait_for(lambda: "Ben Brown" in p.text(), "the signature rendered in its frame")
            p.d.switch_to.default_content()
            p.shot_and_axe("signature-preview-ben")
            assert any(a.get("action") == "signatures.create" and "bootstrap" in a.get("actor", "") for a in fleet.audit())

        @check("the device's config version rises after its agent syncs")
        def version_rises():
            p.go("/devices/" + device_id)
            issued = int(facts(p)["Issued version"])
            assert issued > state["issued"], f"issued {issued} after the change, {state['issued']} before"
            fleet.agent("a", "sync", "--once")
            p.go("/devices/" + device_id)
            held = facts(p)["Version the device holds"]
            assert held == str(issued), f"the device holds {held}, the server issued {issued}"
            p.shot_and_axe("device-after-sync")

        @check("sign out, then be refused")
        def signout():
            p.go("/")
            button = p.tab_to(lambda el: el.tag_name == "button" and el.text == "Sign out")
            button.send_keys(Keys.ENTER)
            p.wait_for(lambda: "You are signed out." in p.text(), "the sign-in page")
            p.shot_and_axe("signed-out")
            p.go("/devices/" + device_id)
            p.wait_for(lambda: "/signin" in p.d.current_url, "the refusal")
            assert "PC-ANNA" not in p.text()

        for step in [signin_page, signin, search, reassign, recovery_key, install, users_groups, settings, signatures, version_rises, signout]:
            step()
    except (WebDriverException, RuntimeError, OSError) as e:
        results.append(("setup", False, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__))
        print(f"FAIL setup: {results[-1][2]}", flush=True)
    finally:
        if driver is not None:
            driver.quit()
        if fleet is not None:
            fleet.stop()
            if any(not ok for _, ok, _ in results):
                with open(os.path.join(tmp, "server.log"), errors="replace") as f:
                    tail = f.read().splitlines()[-20:]
                print("server log (last lines):\n" + "\n".join(tail))
        shutil.rmtree(tmp, ignore_errors=True)
    passed = sum(1 for _, ok, _ in results if ok)
    failed = len(results) - passed
    print(f"screenshots: {SHOTS}")
    print(f"portal stage: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
